"""Celery app factory, queue names and task names. No task code lives here.

The service enqueues by name (``send_task``) with a job id only, so it never imports the worker.
Broker: Redis in production and tests; by default a filesystem broker under data_dir that needs
no server (``make run``).
"""

from __future__ import annotations

from celery import Celery

from common.config import Settings

QUEUE_CPU = "cpu"
QUEUE_GPU = "gpu"

TASK_PIPELINE = "pipeline.run"  # args: (job_id,) — runs the CPU stages, hands off to the GPU stage
TASK_SYNTHESIZE = "pipeline.synthesize"  # args: (job_id,) — core segmentation + synthesis, queue gpu
TASK_FINISH = "pipeline.finish"  # args: (job_id,) — measure, encode, push, queue cpu
TASK_PUSH = "pipeline.push"  # args: (job_id,) — (re)try pending deliveries

TASK_QUEUES = {
    TASK_PIPELINE: QUEUE_CPU,
    TASK_SYNTHESIZE: QUEUE_GPU,
    TASK_FINISH: QUEUE_CPU,
    TASK_PUSH: QUEUE_CPU,
}
# Which task runs which pipeline stages, in order; the lease reaper re-queues a lost stage's task.
TASK_STAGES = {
    TASK_PIPELINE: ("classify", "load"),
    TASK_SYNTHESIZE: ("core", "synthesize"),
    TASK_FINISH: ("measure", "encode", "push"),
}
NEXT_TASK = {TASK_PIPELINE: TASK_SYNTHESIZE, TASK_SYNTHESIZE: TASK_FINISH, TASK_FINISH: None}
TASK_OF_STAGE = {stage: task for task, stages in TASK_STAGES.items() for stage in stages}


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from settings (used by both the sender and the worker)."""
    app = Celery("synthperf")
    broker = settings.effective_broker_url
    conf: dict = {
        "broker_url": broker,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(settings.task_time_limit_s - 30, 10),
        "task_routes": {name: {"queue": q} for name, q in TASK_QUEUES.items()},
        "task_default_queue": QUEUE_CPU,
        "broker_connection_retry_on_startup": True,
        # A pool process that loads slowly must not be killed as "not up" (issue 16); the model
        # itself loads in a background thread, so this is only a margin for heavy imports.
        "worker_proc_alive_timeout": 30.0,
        # Liveness comes from the job store's leases (worker.pipeline.lease): a lost worker's job is
        # re-queued within lease_s + lease_reap_s. Acks stay late and a lost pool process's task is
        # requeued at once (reject_on_worker_lost); the broker's own redelivery of an unacknowledged
        # task is only a backstop, and the copy it delivers is dropped by the lease check when the
        # job has moved on. It must outlast the longest push countdown (push_backoff_max_s).
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout_s},
    }
    if broker.startswith("filesystem://"):
        folder = settings.broker_dir
        for sub in ("in", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "in"),
            "data_folder_out": str(folder / "in"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            # Exchange tables; kombu's default is ./control in the working directory.
            "control_folder": str(folder / "control"),
        }
    app.conf.update(conf)
    return app
