"""A thread that upserts this process's Heartbeat rows every few seconds (SCP, completion, worker)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from common.jobstore import queries
from common.jobstore.db import session_scope

log = logging.getLogger("synthperf.heartbeat")


class Heartbeat:
    """Calls each ``info()`` and stores it as the component's heartbeat, every ``period_s``."""

    def __init__(
        self, database_url: str, components: dict[str, Callable[[], dict[str, Any]]], period_s: float = 5.0
    ) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be positive")
        self.database_url = database_url
        self.components = components
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.ident = f"{socket.gethostname()}:{os.getpid()}"

    def beat(self) -> None:
        with session_scope(self.database_url) as s:
            for name, info in self.components.items():
                queries.upsert_heartbeat(s, name, f"{self.ident}:{name}", info())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:  # noqa: BLE001
                log.exception("heartbeat failed")
            self._stop.wait(self.period_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
