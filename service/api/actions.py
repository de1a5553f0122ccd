"""The dashboard's write paths: retry from a stage, re-push, cancel, delete — each audited.

The API never imports the worker: work is enqueued by task name (common.queue) with the job id
only, and the job store is changed first so the dashboard shows the new state at once. Each
function raises :class:`ActionError` with an HTTP status and words an admin can act on.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from common.config import Settings
from common.jobstore.dashboard_queries import PIPELINE_STAGES
from common.jobstore.models import AuditEntry, Delivery, DeliveryState, Instance, Job, JobState, Series, Study
from common.queue import TASK_PIPELINE, TASK_PUSH, make_celery
from service.api.auth import Principal


class ActionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Enqueuer:
    """Sends tasks by name through a Celery app made lazily from settings (one per API process)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def celery(self) -> Celery:
        with self._lock:
            if self._app is None:
                self._app = make_celery(self._settings)
            return self._app

    def send(self, task: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> None:
        # a short retry: an admin waiting on a button should hear "broker down" within a second or two
        self.celery().send_task(task, args=args, kwargs=kwargs or {}, retry=True,
                                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.3,
                                              "interval_max": 0.5})


def audit(db: Session, principal: Principal | None, action: str, target: str | None,
          detail: dict[str, Any] | None = None, ip: str | None = None) -> AuditEntry:
    entry = AuditEntry(user=principal.username if principal else None, action=action, target=target,
                       detail=detail, ip=ip)
    db.add(entry)
    return entry


def deny_unless_admin(db: Session, principal: Principal, action: str, target: str, ip: str) -> None:
    """403 for viewers, with the refused attempt written to the audit log."""
    if principal.is_admin:
        return
    audit(db, principal, "denied", target, {"action": action}, ip)
    db.commit()
    raise ActionError(403, f"{action} needs the admin role; ask an admin")


def _job(db: Session, job_id: int) -> Job:
    job = db.get(Job, job_id)
    if job is None:
        raise ActionError(404, f"no job {job_id}")
    return job


def _commit_then_send(db: Session, enqueuer: Enqueuer, task: str, args: list[Any], kwargs: dict[str, Any],
                      undo: Callable[[], None]) -> None:
    """Commit the job-store change first, then queue the task.

    The order matters: a worker may run the task the instant it is queued, and it must see the
    new rows (pending deliveries, queued job). If queueing fails, ``undo`` restores what was
    there before and the admin is told to check the broker.
    """
    db.commit()
    try:
        enqueuer.send(task, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - any broker failure means "not queued"
        db.rollback()
        undo()
        db.commit()
        raise ActionError(503, f"could not queue the task: {exc}. Nothing was changed; check the broker (Redis) "
                               "on the system page and try again") from exc


def retry_from_stage(db: Session, enqueuer: Enqueuer, principal: Principal, job_id: int, stage: str,
                     ip: str) -> Job:
    if stage not in PIPELINE_STAGES:
        raise ActionError(400, f"stage {stage!r} is not one of {', '.join(PIPELINE_STAGES)}")
    job = _job(db, job_id)
    if job.state == JobState.RUNNING:
        raise ActionError(409, f"job {job_id} is running; cancel it first, then retry")
    if job.state == JobState.SUPERSEDED:
        raise ActionError(409, f"job {job_id} was superseded by a newer job of the same study; retry that one")
    before = {k: getattr(job, k) for k in ("state", "error", "cancel_requested", "finished_at")}
    job.state = JobState.QUEUED
    job.error = None
    job.cancel_requested = False
    job.finished_at = None
    entry = audit(db, principal, "retry", f"job:{job_id}", {"from_stage": stage, "previous_state": before["state"]}, ip)

    def undo() -> None:
        j = _job(db, job_id)
        for k, v in before.items():
            setattr(j, k, v)
        db.execute(delete(AuditEntry).where(AuditEntry.id == entry.id))

    db.flush()
    _commit_then_send(db, enqueuer, TASK_PIPELINE, [job_id], {"from_stage": stage}, undo)
    return job


_DELIVERY_FIELDS = ("state", "next_attempt_at", "created_at", "last_error")


def repush(db: Session, enqueuer: Enqueuer, principal: Principal, job_id: int, ip: str,
           only_unsent: bool = False) -> int:
    """Mark the job's deliveries pending and due now, with a fresh retry period, then queue the push
    task; returns the rows re-queued. The stored files are sent as they are, never re-encoded."""
    job = _job(db, job_id)
    if job.state in (JobState.QUEUED, JobState.RUNNING):
        raise ActionError(409, f"job {job_id} is still {job.state}; its outputs are not written yet")
    if job.state == JobState.SUPERSEDED:
        raise ActionError(409, f"job {job_id} was superseded by a newer job of the same study; re-push that one")
    q = select(Delivery).where(Delivery.job_id == job_id)
    if only_unsent:
        q = q.where(Delivery.state != DeliveryState.SENT)
    rows = list(db.scalars(q))
    if not rows:
        raise ActionError(409, f"job {job_id} has no {'unsent ' if only_unsent else ''}objects to push")
    before_rows = {r.id: {k: getattr(r, k) for k in _DELIVERY_FIELDS} for r in rows}
    before_job = {k: getattr(job, k) for k in ("state", "error", "finished_at")}
    now = datetime.now(UTC)
    for r in rows:
        r.state = DeliveryState.PENDING
        r.next_attempt_at = now
        r.created_at = now  # the retry period starts again (worker/pipeline/push.py dead-letters by it)
        r.last_error = None
    job.state = JobState.DELIVERING
    job.error = None
    job.finished_at = None
    entry = audit(db, principal, "repush", f"job:{job_id}",
                  {"objects": len(rows), "only_unsent": only_unsent, "previous_state": before_job["state"]}, ip)

    def undo() -> None:
        for rid, values in before_rows.items():
            row = db.get(Delivery, rid)
            if row is not None:
                for k, v in values.items():
                    setattr(row, k, v)
        j = _job(db, job_id)
        for k, v in before_job.items():
            setattr(j, k, v)
        db.execute(delete(AuditEntry).where(AuditEntry.id == entry.id))

    db.flush()
    _commit_then_send(db, enqueuer, TASK_PUSH, [job_id], {}, undo)
    return len(rows)


def cancel(db: Session, principal: Principal, job_id: int, ip: str) -> Job:
    job = _job(db, job_id)
    if job.state in JobState.FINAL:
        raise ActionError(409, f"job {job_id} already finished ({job.state}); nothing to cancel")
    job.cancel_requested = True
    if job.state == JobState.QUEUED:  # no worker holds it yet: cancelled now
        job.state = JobState.CANCELLED
        job.finished_at = datetime.now(UTC)
    audit(db, principal, "cancel", f"job:{job_id}", {"state_after": job.state}, ip)
    db.commit()
    return job


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def _remove_tree(path: Path, root: Path) -> bool:
    """rmtree ``path`` only when it lies strictly inside ``root``."""
    if path.resolve() == root.resolve() or not _inside(path, root) or not path.exists():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def study_spool_dirs(db: Session, settings: Settings, study_id: int) -> list[Path]:
    """Top-level spool folders holding this study's instances (paths are relative to the spool)."""
    tops: set[str] = set()
    rows = db.scalars(select(Instance.path).join(Series, Instance.series_id == Series.id)
                      .where(Series.study_id == study_id))
    for rel in rows:
        parts = Path(rel).parts
        if parts and not Path(rel).is_absolute() and ".." not in parts:
            tops.add(parts[0] if len(parts) > 1 else rel)
    return [settings.spool_dir / t for t in sorted(tops)]


def delete_job(db: Session, settings: Settings, principal: Principal, job_id: int, confirm: str,
               purge_study: bool, ip: str) -> dict[str, Any]:
    """Delete a job (and its outputs); with ``purge_study`` also the study's spool files and rows.

    ``confirm`` must repeat the job id: deleting is never one careless click.
    """
    job = _job(db, job_id)
    if str(confirm).strip() != str(job_id):
        raise ActionError(400, f"not deleted: type the job number {job_id} in the confirmation box")
    if job.state == JobState.RUNNING:
        raise ActionError(409, f"job {job_id} is running; cancel it first, then delete")
    study = job.study
    jobs = list(study.jobs) if purge_study else [job]
    if purge_study and any(j.state == JobState.RUNNING for j in jobs):
        raise ActionError(409, "another job of this study is running; cancel it first")
    outputs_removed = 0
    for j in jobs:
        out = Path(j.output_dir) if j.output_dir else None
        if out is not None and not out.is_absolute():
            out = settings.output_dir / out
        if out is not None and _remove_tree(out, settings.output_dir):
            outputs_removed += 1
    ids = [j.id for j in jobs]
    db.execute(update(Job).where(Job.supersedes_job_id.in_(ids)).values(supersedes_job_id=None)
               .execution_options(synchronize_session=False))
    detail: dict[str, Any] = {
        "purge_study": purge_study,
        "jobs": ids,
        "outputs_removed": outputs_removed,
        # a hash, not the UID itself: the audit log must not become a patient index
        "study_uid_sha256": hashlib.sha256(study.study_uid.encode()).hexdigest()[:16],
    }
    if purge_study:
        removed = [d.name for d in study_spool_dirs(db, settings, study.id) if _remove_tree(d, settings.spool_dir)]
        detail["spool_dirs_removed"] = len(removed)
        db.delete(study)
    else:
        db.delete(job)
    audit(db, principal, "delete", f"job:{job_id}", detail, ip)
    db.commit()
    return detail


def study_of(db: Session, job_id: int) -> Study | None:
    job = db.get(Job, job_id)
    return job.study if job else None
