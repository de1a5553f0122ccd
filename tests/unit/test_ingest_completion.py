"""Completion rules per study (a declared series completes only itself; stable_age, the wait for a
short declared series, ceiling), follow-up jobs that supersede earlier ones whatever their state,
and the dashboard's counts by each study's latest job; on SQLite and on PostgreSQL
(``jobstore_url`` in tests/conftest.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from common.jobstore.dashboard_queries import jobs_by_state, studies_by_state
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
    loop = CompletionLoop(url, sent.append, stable_age_s=10, ceiling_s=60, poll_s=0.1, incomplete_wait_s=30)
    return Receiver(url, Spool(tmp_path / "spool", fsync=False)), loop, sent


def _jobs(url: str) -> list[Job]:
    with session_scope(url) as s:
        return list(s.query(Job).order_by(Job.id))


def test_a_declared_series_completes_only_itself_the_study_waits_for_stable_age(env) -> None:  # type: ignore[no-untyped-def]
    rx, loop, sent = env
    declared_study, open_study = generate_uid(), generate_uid()
    series = generate_uid()
    for i in range(4):
        _send(rx, make_ds(declared_study, series, ImagesInAcquisition=4, InstanceNumber=i + 1))
    open_series = generate_uid()
    for i in range(3):
        _send(rx, make_ds(open_study, open_series, InstanceNumber=i + 1))
    now = datetime.now(UTC)  # after the last receipt: on a loaded machine the sends may take seconds
    # A complete declared series says nothing about the series still to come: no job yet.
    assert loop.run_once(now + timedelta(seconds=1)) == []
    assert loop.run_once(now + timedelta(seconds=5)) == []
    ids = loop.run_once(now + timedelta(seconds=11))
    assert len(ids) == 2 and sent == ids
    with session_scope(rx.database_url) as s:
        by_study = {j.study.study_uid: (j.trigger, j.instance_count) for j in s.query(Job)}
    assert by_study == {declared_study: ("expected_count", 4), open_study: ("stable_age", 3)}
    assert loop.run_once(now + timedelta(seconds=30)) == []  # one job per study, no repeats


def test_enhanced_multiframe_study_arriving_in_pieces_makes_one_job(env) -> None:  # type: ignore[no-untyped-def]
    """One multi-frame object per series, each complete on arrival (NumberOfFrames): the first
    object used to complete the whole study, so the DWI alone made a job."""
    rx, loop, sent = env
    study = generate_uid()
    _send(rx, make_ds(study, generate_uid(), NumberOfFrames=25, SeriesDescription="DWI b1000"))
    assert loop.run_once(datetime.now(UTC) + timedelta(seconds=1)) == []
    for description in ("b0", "ADC", "FLAIR", "T1", "T2", "localizer"):
        _send(rx, make_ds(study, generate_uid(), NumberOfFrames=20, SeriesDescription=description))
        assert loop.run_once(datetime.now(UTC) + timedelta(seconds=2)) == []
    last = datetime.now(UTC)
    [job_id] = loop.run_once(last + timedelta(seconds=10.5))
    (job,) = _jobs(rx.database_url)
    assert job.id == job_id and sent == [job_id]
    assert job.trigger == "expected_count" and job.instance_count == 7
    assert loop.run_once(last + timedelta(seconds=60)) == []


def test_incomplete_declared_series_holds_the_study_until_its_wait(env) -> None:  # type: ignore[no-untyped-def]
    rx, loop, _sent = env
    study, series = generate_uid(), generate_uid()
    for i in range(3):
        _send(rx, make_ds(study, series, ImagesInAcquisition=5, InstanceNumber=i + 1))
    _send(rx, make_ds(study, generate_uid()))  # an undeclared series beside it
    now = datetime.now(UTC)  # after the last receipt
    assert loop.run_once(now + timedelta(seconds=2)) == []
    assert loop.run_once(now + timedelta(seconds=10.5)) == []  # quiet, but 3 of 5 declared images
    assert loop.next_due_s is not None and 19 < loop.next_due_s <= 20
    [job_id] = loop.run_once(now + timedelta(seconds=30.5))
    (job,) = _jobs(rx.database_url)
    assert job.trigger == "incomplete" and job.instance_count == 4


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


def _job_ids(url: str, study_uid: str) -> list[int]:
    """The study's job ids, oldest first."""
    with session_scope(url) as s:
        return [j.id for j in s.query(Job).order_by(Job.version) if j.study.study_uid == study_uid]


def _set_state(url: str, job_id: int, state: str) -> None:
    with session_scope(url) as s:
        s.get(Job, job_id).state = state


@pytest.mark.parametrize("state", [JobState.FAILED, JobState.INPUT_MISSING, JobState.DONE, JobState.CANCELLED])
def test_a_finished_job_is_superseded_by_the_follow_up_and_counts_no_more(env, state: str) -> None:  # type: ignore[no-untyped-def]
    rx, loop, _sent = env
    study, series = generate_uid(), generate_uid()
    _send(rx, make_ds(study, series))
    [first] = loop.run_once(datetime.now(UTC) + timedelta(seconds=11))
    _set_state(rx.database_url, first, state)  # the worker finished it on the part that had arrived
    with session_scope(rx.database_url) as s:
        assert studies_by_state(s)[state] == 1
    _send(rx, make_ds(study, generate_uid()))  # the rest of the study
    [second] = loop.run_once(datetime.now(UTC) + timedelta(seconds=11))
    _set_state(rx.database_url, second, JobState.DONE)
    jobs = _jobs(rx.database_url)
    assert [(j.id, j.state) for j in jobs] == [(first, JobState.SUPERSEDED), (second, JobState.DONE)]
    assert not jobs[0].cancel_requested and jobs[0].finished_at is not None
    with session_scope(rx.database_url) as s:
        counts, by_job = studies_by_state(s), jobs_by_state(s)
    assert counts[JobState.DONE] == 1 and sum(counts.values()) == 1
    assert by_job[state if state != JobState.DONE else JobState.SUPERSEDED] == (1 if state == JobState.DONE else 0)
    assert by_job[JobState.SUPERSEDED] == 1


def test_a_job_that_fails_after_its_follow_up_was_created_is_superseded_next_pass(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The race of the issue: the worker records "no FLAIR" on the early job after completion
    created the follow-up; the early job must not stay input_missing beside the good one."""
    from common.config import load_settings
    from common.errors import InputMissingError
    from worker.pipeline.run import DbRecorder

    rx, loop, _sent = env
    study, delivering = generate_uid(), generate_uid()  # the second study's early job is still delivering
    _send(rx, make_ds(study, generate_uid(), NumberOfFrames=25))
    _send(rx, make_ds(delivering, generate_uid()))
    assert len(loop.run_once(datetime.now(UTC) + timedelta(seconds=11))) == 2
    [first], [early] = _job_ids(rx.database_url, study), _job_ids(rx.database_url, delivering)
    recorder = DbRecorder(load_settings(data_dir=tmp_path, database_url=rx.database_url), first)
    recorder.start("classify")  # a worker picked the early job up
    _set_state(rx.database_url, early, JobState.DELIVERING)
    _send(rx, make_ds(study, generate_uid(), NumberOfFrames=26))  # FLAIR arrives
    _send(rx, make_ds(delivering, generate_uid()))
    assert len(loop.run_once(datetime.now(UTC) + timedelta(seconds=11))) == 2
    second, later = _job_ids(rx.database_url, study)[1], _job_ids(rx.database_url, delivering)[1]
    states = {j.id: j.state for j in _jobs(rx.database_url)}
    assert states[first] == JobState.SUPERSEDED and states[early] == JobState.DELIVERING
    recorder.fail("classify", InputMissingError("no FLAIR: only DWI arrived"))
    _set_state(rx.database_url, early, JobState.DONE)  # its push finished
    assert {j.id: j.state for j in _jobs(rx.database_url)}[first] == JobState.INPUT_MISSING  # as the worker wrote
    assert loop.run_once() == []
    states = {j.id: j.state for j in _jobs(rx.database_url)}
    assert states == {first: JobState.SUPERSEDED, early: JobState.SUPERSEDED, second: JobState.QUEUED,
                      later: JobState.QUEUED}
    with session_scope(rx.database_url) as s:
        assert studies_by_state(s)[JobState.QUEUED] == 2 and jobs_by_state(s)[JobState.INPUT_MISSING] == 0
