"""Celery tasks, by the names in common.queue. Only job ids travel through the broker.

pipeline.run (cpu): classify, load  -> pipeline.synthesize (gpu): core, synthesize
-> pipeline.finish (cpu): measure, encode, push -> pipeline.push (cpu) again, with a countdown,
while deliveries wait for a PACS.

Stroke first (issue 16): a worker that also consumes the next task's queue runs that task's stages
in the same task instead of queueing them behind every other study's first stage. With one worker
on both queues (``synthperf serve``) a study runs from classify to push before the next study
starts; workers split by queue still hand off through the broker.

Every task first claims the job's lease (common/jobstore/leases.py) and renews it while it runs;
a task that finds the job held by a live worker, or already past its stages with nobody lost on
the way, is a duplicate (the broker's backstop redelivery) and ends at once.

A failed stage is recorded in the job (state, error a user can act on) by the recorder; the task
then ends without raising again, so Celery does not redeliver work that would fail the same way.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import select

from common.config import get_settings
from common.jobstore import leases
from common.jobstore.db import session_scope
from common.jobstore.models import Delivery, DeliveryState, Job, JobState
from common.procs import owner_ident
from common.queue import (
    NEXT_TASK,
    TASK_FINISH,
    TASK_PIPELINE,
    TASK_PUSH,
    TASK_QUEUES,
    TASK_STAGES,
    TASK_SYNTHESIZE,
)
from worker.celery_app import app, consumes
from worker.lease import LeasedRecorder, LeaseKeeper
from worker.pipeline.run import job_context, run_stages

log = logging.getLogger(__name__)


def chain_from(task_name: str, enabled: bool = True) -> list[str]:
    """``task_name`` and the tasks after it whose queue this worker consumes (run inline)."""
    chain = [task_name]
    while enabled and (nxt := NEXT_TASK[chain[-1]]) is not None and consumes(TASK_QUEUES[nxt]):
        chain.append(nxt)
    return chain


def _all_done(rec: LeasedRecorder, tasks: list[str]) -> bool:
    return all(rec.is_done(stage) for task in tasks for stage in TASK_STAGES[task])


def _run(task_name: str, job_id: int, from_stage: str | None) -> bool:
    settings = get_settings()
    url = settings.effective_database_url
    owner = owner_ident()
    with session_scope(url) as s:
        claim = leases.claim(s, job_id, owner, settings.lease_s, settings.max_stage_attempts)
        job = s.get(Job, job_id)
        state = job.state if job is not None else None
    if not claim.ok:
        log.info("job %d: %s not run (%s)", job_id, task_name, claim.reason)
        return False
    keeper = LeaseKeeper(url, job_id, owner, settings.lease_s, settings.lease_renew_s).start()
    try:
        if claim.took_over_from:
            log.warning("job %d: took over from lost worker %s", job_id, claim.took_over_from)
        rec = LeasedRecorder(settings, job_id, keeper)
        chain = chain_from(task_name, settings.chain_stages)
        if from_stage is None and (state in JobState.FINAL or (not claim.resumed and _all_done(rec, chain))):
            log.info("job %d: %s is a duplicate (job %s, stages done); dropped", job_id, task_name, state)
            return False
        ctx = job_context(settings, job_id)
        try:
            for task in chain:
                run_stages(ctx, rec, TASK_STAGES[task], from_stage)
        except Exception:  # noqa: BLE001 - recorded in the job by the recorder (or the lease was lost)
            return False
        nxt = NEXT_TASK[chain[-1]]
        if nxt is not None:
            app.send_task(nxt, args=(job_id, from_stage))
        else:
            schedule_push(job_id)
        return True
    finally:
        keeper.stop()


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
