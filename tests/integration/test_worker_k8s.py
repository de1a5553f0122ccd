"""The worker entry points of deploy/k8s, as real Celery workers on Redis.

worker.k8s: the alive file the liveness probe reads is touched again and again while the worker
runs, and removed when it stops. worker.oneshot (KEDA ScaledJob pods): the worker runs exactly one
task of two waiting, exits 0 and leaves the other in the queue; with nothing to do it exits 0 after
its idle time. Each worker gets a queue of its own on the tests' Redis database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from common.config import load_settings
from common.queue import make_celery
from tests.conftest import REPO_ROOT

NOOP = "k8s-test.noop"
# The worker under test: module values patched before the app starts (period, idle time, file),
# plus one task that does nothing but take a moment.
SCRIPT = f"""
import sys, time, pathlib
import worker.k8s as k
k.ALIVE_FILE = pathlib.Path(sys.argv[1]); k.ALIVE_PERIOD_S = 0.3
import worker.oneshot as o
o.IDLE_EXIT_S = float(sys.argv[3])

@o.app.task(name={NOOP!r})
def noop():
    time.sleep(1.0)
    return 1

o.app.worker_main(["worker", "-Q", sys.argv[2], "--pool", "solo", "--concurrency", "1", "--disable-prefetch",
                   "--without-gossip", "--without-mingle", "--without-heartbeat", "--hostname", "k8stest@%h",
                   "--loglevel", "INFO"])
"""


def start_worker(tmp_path: Path, redis_url: str, queue: str, idle_s: float) -> tuple[subprocess.Popen, Path]:
    alive = tmp_path / "alive"
    env = {**os.environ, "SYNTHPERF_DATA_DIR": str(tmp_path / "data"), "SYNTHPERF_BROKER_URL": redis_url}
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(alive), queue, str(idle_s)], cwd=REPO_ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, alive


def wait_exit(proc: subprocess.Popen, tmp_path: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail("worker did not exit:\n" + (tmp_path / "worker.log").read_text()[-4000:])


def test_oneshot_worker_runs_one_task_and_keeps_its_alive_file_fresh(tmp_path, redis_url):
    queue = f"k8stest-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(redis_url)
    proc, alive = start_worker(tmp_path, redis_url, queue, idle_s=60)
    try:
        deadline = time.monotonic() + 120
        while not alive.exists():
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the alive file never appeared"
            time.sleep(0.2)
        first = alive.stat().st_mtime_ns
        deadline = time.monotonic() + 20
        while alive.stat().st_mtime_ns == first:
            assert time.monotonic() < deadline, "the alive file was not touched again"
            time.sleep(0.1)
        app = make_celery(load_settings(data_dir=tmp_path / "data", broker_url=redis_url))
        for _ in range(2):
            app.send_task(NOOP, queue=queue)
        assert wait_exit(proc, tmp_path, timeout=90) == 0
        assert r.llen(queue) == 1  # the second task waits for the next Job
        assert not alive.exists()  # removed on a clean stop
        assert "oneshot worker stopping: task" in (tmp_path / "worker.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        r.delete(queue)


def test_oneshot_worker_without_work_exits_after_its_idle_time(tmp_path, redis_url):
    queue = f"k8stest-{uuid.uuid4().hex[:8]}"
    proc, _alive = start_worker(tmp_path, redis_url, queue, idle_s=2)
    assert wait_exit(proc, tmp_path, timeout=120) == 0
    assert "no task within 2 s" in (tmp_path / "worker.log").read_text()
