"""The worker's Celery app: ``celery -A worker.celery_app worker -Q cpu`` (or ``-Q gpu``).

The app comes from :func:`common.queue.make_celery` so sender and worker agree on broker, routes
and time limits. A worker that consumes the ``gpu`` queue loads the model once per worker
process, after fork (``worker_process_init``): CUDA cannot cross a fork, and loading per task
would cost seconds each time. When the worker is ready it re-enqueues the push of every job that
still has deliveries pending, so a restart never strands results.
"""

from __future__ import annotations

import logging

from celery.signals import celeryd_after_setup, worker_process_init, worker_ready, worker_shutdown

from common.config import get_settings
from common.errors import ModelError
from common.heartbeat import Heartbeat
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


@celeryd_after_setup.connect
def _note_queues(sender, instance, conf, **_kwargs):  # type: ignore[no-untyped-def]
    global _consumes_gpu
    try:
        queues = set(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    except Exception:  # noqa: BLE001 - no queue information: assume the default (cpu) only
        queues = set()
    _consumes_gpu = QUEUE_GPU in queues
    _queues.clear()
    _queues.update(getattr(q, "name", str(q)) for q in queues)


@worker_process_init.connect
def _load_model(**_kwargs):  # type: ignore[no-untyped-def]
    from worker.pipeline.encode import warm_up

    warm_up()
    if not _consumes_gpu:
        return
    from worker.pipeline.synthesize import get_synthesizer

    try:
        get_synthesizer(settings.model_name, settings.device)
    except ModelError as exc:  # the job that needs it fails with this message; the worker stays up
        log.error("model not loaded at start: %s", exc)


def _worker_info() -> dict[str, object]:
    """What the dashboard's system page shows for this worker: queues, device and model."""
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "queues": sorted(_queues),
        "device": device,
        "model": settings.model_name,
        "torch": torch.__version__,
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


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs):  # type: ignore[no-untyped-def]
    if _heartbeat is not None:
        _heartbeat.stop()


@worker_ready.connect
def _resume_deliveries(sender, **_kwargs):  # type: ignore[no-untyped-def]
    from worker.tasks import resume_pending_deliveries

    try:
        resume_pending_deliveries()
    except Exception as exc:  # noqa: BLE001 - never keep a worker from starting
        log.warning("could not re-enqueue pending deliveries: %s", exc)
