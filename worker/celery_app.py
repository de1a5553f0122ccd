"""The worker's Celery app: ``celery -A worker.celery_app worker -Q cpu`` (or ``-Q gpu``).

The app comes from :func:`common.queue.make_celery` so sender and worker agree on broker, routes
and time limits. A worker that consumes the ``gpu`` queue loads the model once per worker
process, after fork: CUDA cannot cross a fork, and loading per task would cost seconds each time.
The load runs in a background thread of the pool process (``worker_process_init`` returns at
once): Celery kills a pool process that is not up within ``worker_proc_alive_timeout``, and a
model load that takes longer than that (10 s on 2 cores) made every replacement of a killed pool
process die the same way, forever (issue 16). The first task simply waits for the load to finish
(``get_synthesizer`` holds a lock). When the worker is ready it re-enqueues the push of every job
that still has deliveries pending, so a restart never strands results.

Started by ``synthperf serve`` (``SYNTHPERF_PARENT_PID`` set), the worker asks the kernel to kill
it when ``serve`` dies; every pool process asks the same of the worker, so a SIGKILL anywhere
above leaves no orphan behind. The heartbeat says whether the pool can run tasks (a process is up,
not waiting to start) and when a task was last consumed: the system page counts a worker as
alive only then.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery.signals import (
    celeryd_after_setup,
    task_received,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from common.config import get_settings
from common.errors import ModelError
from common.heartbeat import Heartbeat
from common.jobstore.leases import LeaseReaper
from common.procs import die_with_parent
from common.queue import QUEUE_GPU, make_celery
from worker.rules import load_rules

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]

# Series-classification rules are validated at start-up (issue 5): a broken site rules file stops the
# worker here with a RulesError naming the file and the bad rule, instead of failing every job later.
load_rules(settings.rules_file)

_consumes_gpu = False
_queues: set[str] = set()
_heartbeat: Heartbeat | None = None
_reaper: LeaseReaper | None = None
_controller: Any = None  # the WorkController of this (main) worker process
_last_consumed: float | None = None  # epoch seconds of the last task message received

if os.environ.get("SYNTHPERF_PARENT_PID", "").isdigit():  # started by `synthperf serve`: die with it
    die_with_parent(expected_ppid=int(os.environ["SYNTHPERF_PARENT_PID"]))


@celeryd_after_setup.connect
def _note_queues(sender, instance, conf, **_kwargs):  # type: ignore[no-untyped-def]
    global _consumes_gpu, _controller
    _controller = instance
    try:
        queues = set(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    except Exception:  # noqa: BLE001 - no queue information: assume the default (cpu) only
        queues = set()
    _consumes_gpu = QUEUE_GPU in queues
    _queues.clear()
    _queues.update(getattr(q, "name", str(q)) for q in queues)


def consumes(queue: str) -> bool:
    """Whether this worker consumes ``queue`` (known in the main process before the pool forks)."""
    return queue in _queues


@worker_process_init.connect
def _pool_process_init(**_kwargs):  # type: ignore[no-untyped-def]
    """Runs in each new pool process; must return well within ``worker_proc_alive_timeout``."""
    die_with_parent()  # an orphaned pool process would hold the model's memory and a job's lease
    threading.Thread(target=_preload, name="preload", daemon=True).start()


def _preload() -> None:
    """Warm the encoder's caches and load the model, off the pool's start-up path."""
    from worker.pipeline.encode import warm_up

    t0 = time.perf_counter()
    warm_up()
    if not _consumes_gpu:
        return
    from worker.pipeline.synthesize import get_synthesizer

    try:
        get_synthesizer(settings.model_name, settings.device)
    except ModelError as exc:  # the job that needs it fails with this message; the worker stays up
        log.error("model not loaded at start: %s", exc)
        return
    log.info("model preloaded in %.1f s", time.perf_counter() - t0)


@task_received.connect
def _note_consumed(**_kwargs):  # type: ignore[no-untyped-def]
    global _last_consumed
    _last_consumed = time.time()


def pool_status(controller: Any) -> dict[str, object]:
    """Pool processes alive and up (sent Celery's WORKER_UP), from the main worker process.

    Reads the prefork pool's bookkeeping (private, so guarded): a pool whose processes keep dying
    before they are up has none ready, although the main process still answers pings.
    """
    pool = getattr(controller, "pool", None)
    inner = getattr(pool, "_pool", None)
    if inner is None or not hasattr(inner, "_pool"):  # solo/threads pool: runs tasks in this process
        return {"pool_ready": pool is not None, "pool_processes": 0, "pool_up": 0}
    try:
        procs = [p for p in list(inner._pool) if p.is_alive()]
        waiting = set(getattr(inner, "_waiting_to_start", ()) or ())
        up = sum(1 for p in procs if p not in waiting)
    except Exception:  # noqa: BLE001 - unknown pool internals: say nothing rather than guess
        return {"pool_ready": None}
    return {"pool_ready": up > 0, "pool_processes": len(procs), "pool_up": up}


def resolved_device(device: str) -> str:
    """The device a pool process will use, asked from the main worker process without touching CUDA.

    torch's default availability check initialises the CUDA driver in the calling process, and a
    process forked after that cannot use the GPU ("poison fork", torch.cuda.is_available's docs).
    Every pool process forked after this check (the replacement for one that died, issue 16) would
    be such a child, so "auto" asks through NVML (``PYTORCH_NVML_BASED_CUDA_CHECK=1``) instead. An
    explicit device needs no torch here at all: the main process then never imports it (1.6 s of CPU
    and 214 MB per worker, measured in docs/benchmarks.md, "make test").
    """
    if device != "auto":
        return device
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _worker_info() -> dict[str, object]:
    """What the dashboard's system page shows for this worker: queues, device, model, pool state."""
    from importlib.metadata import version

    return {
        "queues": sorted(_queues),
        "device": resolved_device(settings.device),
        "model": settings.model_name,
        "torch": version("torch"),
        "last_consumed_at": _last_consumed,
        **pool_status(_controller),
    }


@worker_ready.connect
def _start_heartbeat(sender, **_kwargs):  # type: ignore[no-untyped-def]
    """Beat from the main worker process so the system page knows this worker is alive."""
    global _heartbeat
    try:
        _heartbeat = Heartbeat(settings.effective_database_url, {"worker": _worker_info})
        _heartbeat.start()
    except Exception as exc:  # noqa: BLE001 - a dashboard aid must never keep a worker from starting
        log.warning("worker heartbeat not started: %s", exc)


@worker_ready.connect
def _start_reaper(sender, **_kwargs):  # type: ignore[no-untyped-def]
    """Re-queue jobs whose worker was lost (common/jobstore/leases.py), from the main process too:
    it outlives its pool processes, and the gateway may run elsewhere or not at all."""
    global _reaper
    try:
        _reaper = LeaseReaper(settings.effective_database_url, lambda name, args: app.send_task(name, args=args),
                              lease_s=settings.lease_s, max_attempts=settings.max_stage_attempts,
                              period_s=settings.lease_reap_s).start()
    except Exception as exc:  # noqa: BLE001 - never keep a worker from starting
        log.warning("lease reaper not started: %s", exc)


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs):  # type: ignore[no-untyped-def]
    if _heartbeat is not None:
        _heartbeat.stop()
    if _reaper is not None:
        _reaper.stop()


@worker_ready.connect
def _resume_deliveries(sender, **_kwargs):  # type: ignore[no-untyped-def]
    from worker.tasks import resume_pending_deliveries

    try:
        resume_pending_deliveries()
    except Exception as exc:  # noqa: BLE001 - never keep a worker from starting
        log.warning("could not re-enqueue pending deliveries: %s", exc)
