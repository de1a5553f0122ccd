"""A real Celery worker reports itself (queues, device, model) through a Heartbeat row, which the
dashboard's system page reads; without it the page can only guess from broker pings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from common.jobstore.db import session_scope
from common.jobstore.models import Heartbeat
from common.jobstore.queries import init_db

REPO = Path(__file__).resolve().parents[2]


def test_worker_writes_heartbeat_with_device_and_queues(data_dir: Path) -> None:
    url = f"sqlite:///{data_dir / 'synthperf.db'}"
    init_db(url)
    env = dict(os.environ, SYNTHPERF_DATA_DIR=str(data_dir), SYNTHPERF_DEVICE="cpu", SYNTHPERF_MODEL_NAME="demo")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "-Q", "cpu",
         "--concurrency", "1", "--pool", "solo", "--loglevel", "WARNING"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    rows: list[tuple[str, dict]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not rows and proc.poll() is None:
            time.sleep(0.5)
            with session_scope(url) as s:
                rows = [(h.component, dict(h.info or {})) for h in s.query(Heartbeat).all()]
        # read while it runs, after it has reported: what the worker process has loaded
        maps = Path(f"/proc/{proc.pid}/maps").read_text() if rows and proc.poll() is None else ""
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert rows, f"no heartbeat from the worker; its output:\n{out}"
    component, info = rows[0]
    assert component == "worker"
    assert info["device"] == "cpu"
    assert info["queues"] == ["cpu"]
    assert info["model"] == "demo"
    # the version comes from the package metadata: a cpu worker that runs no model never loads torch
    # (before, reporting the version imported it: 2 s of CPU per worker start)
    assert info["torch"] == version("torch")
    assert maps and "libtorch" not in maps, "the worker process loaded torch to report itself"
