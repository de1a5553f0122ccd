"""Job leases: liveness that means work is progressing (issue 16).

A worker process that runs a job's stages holds the job's lease (``jobs.lease_owner`` "host:pid",
``jobs.lease_until``) and renews it every few seconds; it clears the lease only after handing the
job on (next task sent, or the last stage done). When a worker dies (SIGKILL, OOM killer) nothing
renews the lease, so:

* the reaper (:func:`reap`, run by the gateway and by every worker's main process) re-queues a job
  whose lease expired, or whose holder is a process on this host that no longer exists;
* a task that finds the job's lease held by a dead process on this host (Celery requeues a lost pool
  process's task at once) takes the job over (:func:`claim`).

Either way the lost stage is closed as failed ("worker lost") and counts as an attempt; after
``max_attempts`` lost workers in one stage the job is *poisoned* (a final state, not retried
again: a study that kills the worker every time must not kill it forever). Both paths claim with a
compare-and-set on (owner, until), so exactly one of any number of reapers and tasks acts on one
expiry. A task that finds the lease held by a live process, or the job already past the task's
stages, is a duplicate (the broker's backstop redelivery) and is dropped by the caller.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from common.jobstore.db import session_scope
from common.jobstore.models import Job, JobState, Stage, StageState
from common.procs import owner_dead_here, owner_ident
from common.queue import TASK_OF_STAGE, TASK_PIPELINE

log = logging.getLogger("synthperf.leases")

LOST_PREFIX = "worker lost"
QUEUED_OWNER = "queued by "  # placeholder owner between a re-queue and the task's claim


@dataclass(frozen=True)
class Claim:
    """Outcome of :func:`claim`: ``ok`` the caller holds the lease; else ``reason`` says why not."""

    ok: bool
    reason: str = ""  # busy | poisoned | missing
    took_over_from: str | None = None  # the lost holder, when there was one
    resumed: bool = False  # a lost holder or a re-queue came before: hand the job on even if its stages are done


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def _aware(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _cas(session: Session, job_id: int, owner: str | None, until: datetime | None, **values: object) -> bool:
    """Set ``values`` on the job only if its lease is still (owner, until): one winner per change."""
    cond = [Job.id == job_id,
            Job.lease_owner.is_(None) if owner is None else Job.lease_owner == owner,
            Job.lease_until.is_(None) if until is None else Job.lease_until == until]
    res = session.execute(update(Job).where(and_(*cond)).values(**values).execution_options(synchronize_session=False))
    return res.rowcount == 1


def _lost(owner: str | None, until: datetime | None, now: datetime) -> bool:
    """Whether a held lease no longer stands for live work."""
    if owner is None:
        return False
    if owner.startswith(QUEUED_OWNER):
        return True  # re-queued, nobody runs it yet: the next task may take it
    until = _aware(until)
    return until is None or until < now or owner_dead_here(owner)


def _why(owner: str, until: datetime | None, now: datetime) -> str:
    return f"lease of {owner} expired" if (_aware(until) or now) < now else f"{owner} died"


def record_lost(session: Session, job: Job, reason: str, max_attempts: int, now: datetime) -> bool:
    """Close the job's running stage as lost; poison the job after ``max_attempts``. True = poisoned.

    A job that died between stages (its current stage done) loses no attempt: no stage failed.
    """
    running = session.scalars(select(Stage).where(Stage.job_id == job.id, Stage.state == StageState.RUNNING)).all()
    for st in running:
        st.state = StageState.FAILED
        st.finished_at = now
        st.error = f"{LOST_PREFIX}: {reason}"[:4000]
    name = running[-1].name if running else None
    if name is None:
        return False
    lost = sum(1 for st in session.scalars(select(Stage).where(Stage.job_id == job.id, Stage.name == name))
               if (st.error or "").startswith(LOST_PREFIX))
    log.warning("job %d: %s lost its worker (%s), attempt %d of %d", job.id, name, reason, lost, max_attempts)
    if lost < max_attempts:
        return False
    job.state = JobState.POISONED
    job.finished_at = now
    job.lease_owner = None
    job.lease_until = None
    job.error = (f"{name}: the worker died {lost} times running this stage (last: {reason}); the job is not "
                 "retried again. Look for out-of-memory kills in the system log, then retry from this stage on "
                 "the dashboard")
    return True


def claim(session: Session, job_id: int, owner: str, lease_s: float, max_attempts: int,
          now: datetime | None = None) -> Claim:
    """Take the job's lease for ``owner`` (a task starting), taking over from a lost holder."""
    now = _now(now)
    job = session.get(Job, job_id)
    if job is None:
        return Claim(False, "missing")
    for _ in range(3):  # the lease may change under us (a reaper's placeholder): read it again
        session.refresh(job)
        prev_owner, prev_until = job.lease_owner, job.lease_until
        took_over = None
        if prev_owner is not None and prev_owner != owner:
            if not _lost(prev_owner, prev_until, now):
                return Claim(False, "busy")
            if not prev_owner.startswith(QUEUED_OWNER):
                took_over = prev_owner
        if _cas(session, job_id, prev_owner, prev_until, lease_owner=owner,
                lease_until=now + timedelta(seconds=lease_s)):
            break
    else:
        return Claim(False, "busy")
    session.refresh(job)
    if took_over and record_lost(session, job, _why(took_over, prev_until, now), max_attempts, now):
        return Claim(False, "poisoned", took_over)
    return Claim(True, "", took_over, resumed=prev_owner is not None and prev_owner != owner)


def renew(session: Session, job_id: int, owner: str, lease_s: float, now: datetime | None = None) -> bool:
    """Extend ``owner``'s lease; False when it is no longer ours (taken over or cleared)."""
    res = session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner)
                          .values(lease_until=_now(now) + timedelta(seconds=lease_s))
                          .execution_options(synchronize_session=False))
    return res.rowcount == 1


def release(session: Session, job_id: int, owner: str) -> None:
    """Give the lease up (the job was handed on or finished)."""
    session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner)
                    .values(lease_owner=None, lease_until=None).execution_options(synchronize_session=False))


def reap(session: Session, enqueue: Callable[[int, str | None], None], reaper: str, lease_s: float,
         max_attempts: int, now: datetime | None = None) -> list[tuple[int, str]]:
    """Re-queue every job whose lease is lost; returns (job id, "requeued" | "poisoned").

    ``enqueue(job_id, current_stage)`` sends the task that runs the job's current stage; it is
    called after this transaction's changes are flushed but the caller commits, so pass a session
    whose commit follows immediately. The placeholder lease ("queued by <reaper>") makes a lost
    message visible again: if nobody claims the job within ``lease_s`` it is re-queued once more
    without counting an attempt.
    """
    now = _now(now)
    out: list[tuple[int, str]] = []
    held = session.execute(select(Job.id, Job.lease_owner, Job.lease_until, Job.current_stage)
                           .where(Job.lease_owner.is_not(None), Job.state.in_(JobState.ACTIVE))).all()
    for job_id, owner, until, stage in held:
        if owner.startswith(QUEUED_OWNER):
            if (_aware(until) or now) >= now:
                continue  # re-queued recently: give the task time to start
        elif not _lost(owner, until, now):
            continue
        placeholder = {"lease_owner": f"{QUEUED_OWNER}{reaper}"[:200], "lease_until": now + timedelta(seconds=lease_s)}
        if not _cas(session, job_id, owner, until, **placeholder):
            continue
        job = session.get(Job, job_id)
        session.refresh(job)
        if not owner.startswith(QUEUED_OWNER) and record_lost(session, job, _why(owner, until, now), max_attempts, now):
            out.append((job_id, "poisoned"))
            continue
        job.state = JobState.QUEUED if job.state == JobState.RUNNING else job.state
        session.flush()
        enqueue(job_id, stage)
        out.append((job_id, "requeued"))
    return out


class LeaseReaper:
    """A thread that calls :func:`reap` every ``period_s`` and sends the lost stage's task again.

    Runs in the gateway (``synthperf serve``, the scp container) and in every worker's main
    process, so a lost job is re-queued as long as either is up; the compare-and-set in
    :func:`reap` makes them agree on who acts.
    """

    def __init__(self, database_url: str, send_task: Callable[[str, tuple[object, ...]], object], *,
                 lease_s: float, max_attempts: int, period_s: float) -> None:
        if period_s <= 0 or lease_s <= 0 or max_attempts < 1:
            raise ValueError(f"period_s ({period_s}) and lease_s ({lease_s}) must be positive, "
                             f"max_attempts ({max_attempts}) at least 1")
        self.database_url = database_url
        self.send_task = send_task
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.period_s = period_s
        self.ident = owner_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def _enqueue(self, job_id: int, stage: str | None) -> None:
        self.send_task(TASK_OF_STAGE.get(stage or "", TASK_PIPELINE), (job_id, None))

    def reap_once(self) -> list[tuple[int, str]]:
        with session_scope(self.database_url) as s:
            return reap(s, self._enqueue, self.ident, self.lease_s, self.max_attempts)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                for job_id, action in self.reap_once():
                    log.warning("job %d %s after its worker was lost", job_id, action)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("lease reaper failed")

    def start(self) -> LeaseReaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
