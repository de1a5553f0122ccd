"""Completion rules: declared size, stable_age, ceiling, follow-up jobs that supersede; on SQLite and
on PostgreSQL (``jobstore_url`` in tests/conftest.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from common.jobstore.db import session_scope
from common.jobstore.models import Job, JobState
from common.jobstore.queries import init_db, job_instances
from service.ingest.completion import CompletionLoop
from service.ingest.receiver import Receiver
from service.ingest.spool import Spool
from tests.unit.test_ingest_receiver import _send, make_ds


@pytest.fixture
def env(tmp_path: Path, jobstore_url: str) -> tuple[Receiver, CompletionLoop, list[int]]:
    url = jobstore_url
    init_db(url)
    sent: list[int] = []
    loop = CompletionLoop(url, sent.append, stable_age_s=10, ceiling_s=60, poll_s=0.1)
    return Receiver(url, Spool(tmp_path / "spool", fsync=False)), loop, sent


def _jobs(url: str) -> list[Job]:
    with session_scope(url) as s:
        return list(s.query(Job).order_by(Job.id))


def test_declared_series_completes_at_once_others_wait_for_stable_age(env) -> None:  # type: ignore[no-untyped-def]
    rx, loop, sent = env
    declared_study, open_study = generate_uid(), generate_uid()
    series = generate_uid()
    for i in range(4):
        _send(rx, make_ds(declared_study, series, ImagesInAcquisition=4, InstanceNumber=i + 1))
    open_series = generate_uid()
    for i in range(3):
        _send(rx, make_ds(open_study, open_series, InstanceNumber=i + 1))
    now = datetime.now(UTC)  # after the last receipt: on a loaded machine the sends may take seconds
    # Only the study whose every series declares its size and is complete fires now.
    ids = loop.run_once(now + timedelta(seconds=1))
    assert len(ids) == 1 and sent == ids
    (job,) = _jobs(rx.database_url)
    assert job.trigger == "expected_count" and job.instance_count == 4 and job.state == JobState.QUEUED
    assert loop.run_once(now + timedelta(seconds=5)) == []
    ids2 = loop.run_once(now + timedelta(seconds=11))
    assert len(ids2) == 1
    assert _jobs(rx.database_url)[1].trigger == "stable_age"
    assert loop.run_once(now + timedelta(seconds=30)) == []  # one job per study, no repeats


def test_incomplete_declared_series_waits_for_stable_age(env) -> None:  # type: ignore[no-untyped-def]
    rx, loop, _sent = env
    study, series = generate_uid(), generate_uid()
    for i in range(3):
        _send(rx, make_ds(study, series, ImagesInAcquisition=5, InstanceNumber=i + 1))
    now = datetime.now(UTC)  # after the last receipt
    assert loop.run_once(now + timedelta(seconds=2)) == []
    assert len(loop.run_once(now + timedelta(seconds=10.5))) == 1


def test_ceiling_fires_while_instances_trickle(env) -> None:  # type: ignore[no-untyped-def]
    rx, loop, _sent = env
    study, series = generate_uid(), generate_uid()
    _send(rx, make_ds(study, series))
    now = datetime.now(UTC)
    # Pretend the study kept receiving: last arrival "just now" relative to a clock 61 s later.
    with session_scope(rx.database_url) as s:
        from common.jobstore.models import Instance

        inst = s.query(Instance).one()
        inst.received_at = now - timedelta(seconds=61)
    _send(rx, make_ds(study, series))
    ids = loop.run_once(now + timedelta(seconds=1))
    assert len(ids) == 1 and _jobs(rx.database_url)[0].trigger == "ceiling"


def test_late_instances_make_a_follow_up_job_that_supersedes(env) -> None:  # type: ignore[no-untyped-def]
    rx, loop, sent = env
    study, series = generate_uid(), generate_uid()
    for _ in range(2):
        _send(rx, make_ds(study, series))
    t0 = datetime.now(UTC)
    [first] = loop.run_once(t0 + timedelta(seconds=11))
    late = make_ds(study, generate_uid())
    _send(rx, late)
    _send(rx, make_ds(study, series, sop=str(late.SOPInstanceUID)))  # duplicate UID: no new row
    [second] = loop.run_once(datetime.now(UTC) + timedelta(seconds=11))
    jobs = _jobs(rx.database_url)
    assert [j.id for j in jobs] == [first, second] and sent == [first, second]
    assert jobs[0].state == JobState.SUPERSEDED and jobs[0].cancel_requested
    assert jobs[1].supersedes_job_id == first and jobs[1].version == 2 and jobs[1].instance_count == 3
    with session_scope(rx.database_url) as s:
        assert len(job_instances(s, s.get(Job, second))) == 3
        assert len(job_instances(s, s.get(Job, first))) == 2


def test_enqueue_failure_is_retried(env) -> None:  # type: ignore[no-untyped-def]
    rx, loop, _ = env
    attempts: list[int] = []

    def flaky(job_id: int) -> None:
        attempts.append(job_id)
        if len(attempts) == 1:
            raise ConnectionError("broker down")

    loop.enqueue = flaky
    _send(rx, make_ds(generate_uid(), generate_uid()))
    [job_id] = loop.run_once(datetime.now(UTC) + timedelta(seconds=11))
    assert loop.info()["unsent"] == 1
    loop.run_once(datetime.now(UTC) + timedelta(seconds=12))
    assert attempts == [job_id, job_id] and loop.info()["unsent"] == 0
