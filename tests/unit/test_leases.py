"""Job leases (issue 16) on SQLite and PostgreSQL: a worker's lease is renewed while it lives; a lost
one is re-queued exactly once by any number of reapers, taken over by a task, and a stage whose
worker keeps dying poisons the job instead of killing workers forever."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from common.jobstore import leases
from common.jobstore.db import session_scope
from common.jobstore.models import Job, JobState, Stage, StageState, Study
from common.jobstore.queries import init_db
from common.procs import owner_ident

LEASE_S = 20.0


@pytest.fixture
def job_id(jobstore_url: str) -> int:
    init_db(jobstore_url)
    with session_scope(jobstore_url) as s:
        study = Study(study_uid="1.2.3.4")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, trigger="manual", state=JobState.QUEUED)
        s.add(job)
        s.flush()
        return job.id


def _dead_owner() -> str:
    """host:pid of a process of ours that has exited (its pid is not reused within the test)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return owner_ident().rsplit(":", 1)[0] + f":{p.pid}"


def _start_stage(url: str, job_id: int, owner: str, name: str = "synthesize", until: datetime | None = None) -> None:
    """What a worker leaves behind when it dies in ``name``: a running stage and its lease."""
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        job.state, job.current_stage = JobState.RUNNING, name
        job.lease_owner, job.lease_until = owner, until or datetime.now(UTC) + timedelta(seconds=LEASE_S)
        s.add(Stage(job_id=job_id, name=name, state=StageState.RUNNING, started_at=datetime.now(UTC)))


def _reap(url: str, sent: list, now: datetime | None = None, reaper: str = "r1") -> list:
    with session_scope(url) as s:
        return leases.reap(s, lambda j, stage: sent.append((j, stage)), reaper, LEASE_S, 3, now=now)


def test_live_lease_is_renewed_and_neither_reaped_nor_taken(jobstore_url: str, job_id: int) -> None:
    me = owner_ident()
    with session_scope(jobstore_url) as s:
        assert leases.claim(s, job_id, me, LEASE_S, 3).ok
    with session_scope(jobstore_url) as s:
        assert leases.claim(s, job_id, "otherhost:1", LEASE_S, 3).reason == "busy"
    later = datetime.now(UTC) + timedelta(seconds=LEASE_S / 2)
    with session_scope(jobstore_url) as s:
        assert leases.renew(s, job_id, me, LEASE_S, now=later)
    sent: list = []
    assert _reap(jobstore_url, sent, now=later + timedelta(seconds=LEASE_S - 1)) == []
    with session_scope(jobstore_url) as s:
        leases.release(s, job_id, me)
        assert s.get(Job, job_id).lease_owner is None
        assert not leases.renew(s, job_id, me, LEASE_S)  # released: no longer ours


def test_expired_lease_is_requeued_once_by_competing_reapers(jobstore_url: str, job_id: int) -> None:
    _start_stage(jobstore_url, job_id, "otherhost:4242")
    after = datetime.now(UTC) + timedelta(seconds=LEASE_S + 1)
    sent: list = []
    assert _reap(jobstore_url, sent, now=after, reaper="r1") == [(job_id, "requeued")]
    assert _reap(jobstore_url, sent, now=after, reaper="r2") == []  # the placeholder is fresh
    assert sent == [(job_id, "synthesize")]
    with session_scope(jobstore_url) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.QUEUED and job.lease_owner.startswith(leases.QUEUED_OWNER)
        st = s.query(Stage).filter_by(job_id=job_id).one()
        assert st.state == StageState.FAILED and "lease of otherhost:4242 expired" in st.error
    # the re-queued task claims the placeholder and knows it resumes a lost job
    with session_scope(jobstore_url) as s:
        c = leases.claim(s, job_id, owner_ident(), LEASE_S, 3)
    assert c.ok and c.resumed and c.took_over_from is None


def test_requeue_whose_message_was_lost_is_sent_again_without_an_attempt(jobstore_url: str, job_id: int) -> None:
    _start_stage(jobstore_url, job_id, "otherhost:4242", until=datetime.now(UTC) - timedelta(seconds=1))
    sent: list = []
    _reap(jobstore_url, sent)
    assert _reap(jobstore_url, sent, now=datetime.now(UTC) + timedelta(seconds=LEASE_S + 1)) == [(job_id, "requeued")]
    assert len(sent) == 2
    with session_scope(jobstore_url) as s:
        assert s.query(Stage).filter(Stage.error.like("worker lost%")).count() == 1


def test_dead_holder_on_this_host_is_taken_over_before_expiry(jobstore_url: str, job_id: int) -> None:
    dead = _dead_owner()
    _start_stage(jobstore_url, job_id, dead)
    with session_scope(jobstore_url) as s:
        c = leases.claim(s, job_id, owner_ident(), LEASE_S, 3)
    assert c.ok and c.took_over_from == dead and c.resumed
    with session_scope(jobstore_url) as s:
        st = s.query(Stage).filter_by(job_id=job_id).one()
        assert st.state == StageState.FAILED and st.error == f"worker lost: {dead} died"


def test_stage_that_keeps_losing_its_worker_poisons_the_job(jobstore_url: str, job_id: int) -> None:
    sent: list = []
    for attempt in range(1, 4):
        _start_stage(jobstore_url, job_id, "otherhost:4242", until=datetime.now(UTC) - timedelta(seconds=1))
        assert _reap(jobstore_url, sent) == [(job_id, "poisoned" if attempt == 3 else "requeued")]
    assert len(sent) == 2
    with session_scope(jobstore_url) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.POISONED and job.lease_owner is None
        assert job.error.startswith("synthesize: the worker died 3 times")
    assert _reap(jobstore_url, sent) == []  # final: never re-queued again
