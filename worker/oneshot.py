"""A worker that runs one task and exits: ``celery -A worker.oneshot worker -Q gpu --pool solo``.

For KEDA's ScaledJob (deploy/k8s/components/gpu-scaledjob): each Kubernetes Job takes one waiting
task, runs it to the end and exits 0, so no scale-down ever stops a task half-way. A Job that
finds nothing to do (another Job took the task) exits after :data:`IDLE_EXIT_S` seconds instead of
holding a GPU until its deadline. It needs the solo pool: the task then runs in this process,
where ``task_postrun`` fires; with prefork it would fire in a child and the worker would never stop.
Stopping is Celery's own warm shutdown (``worker.state.should_stop``), checked by the event loop
after the task's acknowledgement.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import task_postrun, task_received, worker_ready
from celery.worker import state

from worker.k8s import app

log = logging.getLogger(__name__)

IDLE_EXIT_S = 120.0
_idle_timer: threading.Timer | None = None


def request_stop(reason: str) -> None:
    """Ask the worker for a warm shutdown with exit code 0."""
    log.info("oneshot worker stopping: %s", reason)
    state.should_stop = 0


@worker_ready.connect
def _arm_idle_exit(sender: Any = None, **_kwargs: Any) -> None:
    global _idle_timer
    pool = type(getattr(sender, "pool", None)).__module__
    if not pool.endswith(".solo"):
        log.error("worker.oneshot needs --pool solo (got %s): it would not stop after one task", pool)
    _idle_timer = threading.Timer(IDLE_EXIT_S, request_stop, args=(f"no task within {IDLE_EXIT_S:.0f} s",))
    _idle_timer.daemon = True
    _idle_timer.start()


@task_received.connect
def _disarm_idle_exit(**_kwargs: Any) -> None:
    if _idle_timer is not None:
        _idle_timer.cancel()


@task_postrun.connect
def _stop_after_task(task_id: str | None = None, **_kwargs: Any) -> None:
    request_stop(f"task {task_id} done")


__all__ = ["IDLE_EXIT_S", "app", "request_stop"]
