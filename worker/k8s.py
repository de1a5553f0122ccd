"""The worker's Celery app for Kubernetes: ``celery -A worker.k8s worker -Q cpu`` (deploy/k8s).

It is :mod:`worker.celery_app`'s app plus one bootstep that touches :data:`ALIVE_FILE` every
:data:`ALIVE_PERIOD_S` seconds from the worker's own event loop (Celery's timer). Why: a liveness
probe must be cheap and must fail when the worker hangs. ``celery inspect ping`` starts a Python
process and makes a broker round trip on every probe, and it also fails while the broker is away,
which would restart healthy workers in a Redis outage; so it is used only as the start-up probe.
The file's age is read by ``stat`` in the probe: it grows only when the loop that consumes tasks
and answers the broker has stopped turning. With the prefork pool, tasks run in child processes and
the loop keeps turning while they work; the solo pool (worker.oneshot) blocks it during a task.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import bootsteps

from worker.celery_app import app

log = logging.getLogger(__name__)

ALIVE_FILE = Path("/tmp/synthperf-worker-alive")  # the probes in deploy/k8s read this path
ALIVE_PERIOD_S = 10.0


class AliveFile(bootsteps.StartStopStep):
    """Touch ``path`` every ``period_s`` from the worker's timer; remove it when the worker stops."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, path: Path | None = None, period_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        period_s = ALIVE_PERIOD_S if period_s is None else period_s  # module values read now: tests set them
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, not {period_s}")
        self.path = Path(ALIVE_FILE if path is None else path)
        self.period_s = period_s
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        self.touch()
        self.tref = worker.timer.call_repeatedly(self.period_s, self.touch, priority=10)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        self.path.unlink(missing_ok=True)

    def touch(self) -> None:
        try:
            self.path.touch()
        except OSError as exc:  # a full or read-only /tmp: the probe will say so by restarting us
            log.warning("cannot touch %s: %s", self.path, exc)


app.steps["worker"].add(AliveFile)

__all__ = ["ALIVE_FILE", "AliveFile", "app"]
