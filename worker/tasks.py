"""Celery tasks, by the names in common.queue. Only job ids travel through the broker.

pipeline.run (cpu): classify, load  -> pipeline.synthesize (gpu): core, synthesize
-> pipeline.finish (cpu): measure, encode, push -> pipeline.push (cpu) again, with a countdown,
while deliveries wait for a PACS.

A failed stage is recorded in the job (state, error a user can act on) by the recorder; the task
then ends without raising again, so Celery does not redeliver work that would fail the same way.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import select

from common.config import get_settings
from common.jobstore.db import session_scope
from common.jobstore.models import Delivery, DeliveryState, Job, JobState
from common.queue import TASK_FINISH, TASK_PIPELINE, TASK_PUSH, TASK_SYNTHESIZE
from worker.celery_app import app
from worker.pipeline.run import TASK_STAGES, DbRecorder, job_context, run_stages

log = logging.getLogger(__name__)

NEXT_TASK = {TASK_PIPELINE: TASK_SYNTHESIZE, TASK_SYNTHESIZE: TASK_FINISH, TASK_FINISH: None}


def _run(task_name: str, job_id: int, from_stage: str | None) -> bool:
    settings = get_settings()
    ctx = job_context(settings, job_id)
    rec = DbRecorder(settings, job_id)
    try:
        run_stages(ctx, rec, TASK_STAGES[task_name], from_stage)
    except Exception:  # noqa: BLE001 - recorded in the job by the recorder
        return False
    nxt = NEXT_TASK[task_name]
    if nxt is not None:
        app.send_task(nxt, args=(job_id, from_stage))
    else:
        schedule_push(job_id)
    return True


@app.task(name=TASK_PIPELINE)
def run_pipeline(job_id: int, from_stage: str | None = None) -> bool:
    return _run(TASK_PIPELINE, job_id, from_stage)


@app.task(name=TASK_SYNTHESIZE)
def synthesize(job_id: int, from_stage: str | None = None) -> bool:
    return _run(TASK_SYNTHESIZE, job_id, from_stage)


@app.task(name=TASK_FINISH)
def finish(job_id: int, from_stage: str | None = None) -> bool:
    return _run(TASK_FINISH, job_id, from_stage)


def schedule_push(job_id: int) -> float | None:
    """Enqueue the next push attempt for a job when deliveries are pending; returns the countdown."""
    settings = get_settings()
    with session_scope(settings.effective_database_url) as s:
        times = s.scalars(select(Delivery.next_attempt_at).where(
            Delivery.job_id == job_id, Delivery.state == DeliveryState.PENDING)).all()
    if not times:
        return None
    earliest = min(t if t.tzinfo else t.replace(tzinfo=UTC) for t in times)
    countdown = max(0.0, (earliest - datetime.now(UTC)).total_seconds())
    app.send_task(TASK_PUSH, args=(job_id,), countdown=countdown)
    return countdown


@app.task(name=TASK_PUSH)
def push(job_id: int) -> dict:
    from worker.pipeline.push import push_due

    settings = get_settings()
    report = push_due(settings, job_id)
    if not report.complete:
        schedule_push(job_id)
    return report.as_dict()


def resume_pending_deliveries() -> int:
    """Enqueue a push for every job with pending deliveries (worker start-up)."""
    settings = get_settings()
    with session_scope(settings.effective_database_url) as s:
        ids = sorted(set(s.scalars(select(Delivery.job_id).join(Job).where(
            Delivery.state == DeliveryState.PENDING, Job.state == JobState.DELIVERING)).all()))
    for job_id in ids:
        schedule_push(job_id)
    return len(ids)
