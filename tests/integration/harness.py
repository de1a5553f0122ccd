"""Shared pieces of the integration harnesses that run our service as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


class ProcessGroup:
    """Processes started in their own process groups (``start_new_session=True``), logging to
    ``<folder>/*.log``; stopped with SIGTERM (warm shutdown), then SIGKILL after 30 s."""

    folder: Path
    procs: list[subprocess.Popen]

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in self.folder.glob("*.log"))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
