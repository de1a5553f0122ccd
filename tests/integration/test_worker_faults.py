"""Worker faults a hospital will see (issue 16), on one shared service: ``synthperf serve`` with its
own Celery worker on a private Redis, a real Orthanc as the PACS, DCMTK storescu as the scanner.

1. SIGKILL of the worker's main process during synthesis (the OOM killer): serve starts a new
   worker, the job's lease expires, the reaper re-queues the lost stage once, the job completes and
   Orthanc holds every object exactly once.
2. SIGKILL of only the pool process during synthesis: Celery requeues the task at once, the
   replacement pool process comes up (the model loads off its start-up path) and takes the job
   over from the dead holder; again every object exactly once.
3. SIGKILL of ``serve``: the worker dies with it (no orphan); a second ``serve`` on the same data
   dir is refused while one runs; after a restart there is exactly one worker.

The steps share one service because each start loads the model; they run in order in one test.
The waits are bounds (90 s after a kill plus the job's own time), not timing assertions; the
measured recovery times are in docs/operations.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, require_tool
from tests.integration import harness
from tests.integration.harness import OrthancServer, PrivateRedis, ServiceProcesses, service_config, storescu
from tests.integration.test_process import model_ref, write_phantom  # noqa: F401 - fixture re-export

RECOVERY_BOUND_S = 90.0


def _proc_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def celery_processes(config: Path) -> dict[int, int]:
    """pid -> parent pid of every Celery worker process (main and pool) started for ``config``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"worker.celery_app" in cmd and _proc_env(int(entry.name)).get("SYNTHPERF_CONFIG") == str(config):
            out[int(entry.name)] = _ppid(int(entry.name))
    return out


class ServeWithWorker(ServiceProcesses):
    """``synthperf serve --no-api`` with its own worker child (the production single-box layout)."""

    def __init__(self, folder: Path, redis_url: str, orthanc: OrthancServer, model: str) -> None:
        self.scp_port = free_port()
        # Synthesis long enough (several seconds) to be caught running; short leases so a lost
        # worker is noticed within the test's bound.
        super().__init__(folder, service_config(folder, redis_url, orthanc, model, self.scp_port, ddim_steps=2,
                                                samples=2, lease_s=10.0, lease_renew_s=2.0, lease_reap_s=2.0))
        self.serve: subprocess.Popen | None = None

    def start_serve(self) -> subprocess.Popen:
        self.serve = self.spawn("serve", [sys.executable, "-m", "cli.main", "serve", "--config", str(self.config),
                                          "--no-api"])
        return self.serve

    def worker_main(self) -> int | None:
        mains = [pid for pid, ppid in celery_processes(self.config).items() if self.serve and ppid == self.serve.pid]
        return mains[0] if len(mains) == 1 else None

    def pool_children(self, main: int) -> list[int]:
        return [pid for pid, ppid in celery_processes(self.config).items() if ppid == main]

    def wait_ready(self, timeout: float = 180.0) -> int:
        """Wait for the SCP (C-ECHO) and a worker whose heartbeat says its pool is up; its main pid."""
        echoscu = require_tool("echoscu")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serve is None or self.serve.poll() is not None:
                raise RuntimeError(f"serve exited:\n{self.logs()}")
            main = self.worker_main()
            r = subprocess.run([echoscu, "-aec", "SYNTHPERF", "127.0.0.1", str(self.scp_port)], capture_output=True,
                               timeout=10)
            if main is not None and r.returncode == 0 and self._pool_ready(main):
                return main
            time.sleep(0.5)
        raise RuntimeError(f"service not ready:\n{self.logs()}")

    def _pool_ready(self, main: int) -> bool:
        from common.jobstore.db import session_scope
        from common.jobstore.models import Heartbeat

        try:
            with session_scope(self.settings.effective_database_url) as s:
                rows = s.query(Heartbeat).filter(Heartbeat.instance.like(f"%:{main}:worker")).all()
                return any((r.info or {}).get("pool_ready") for r in rows)
        except Exception:  # noqa: BLE001 - the job store may not exist yet
            return False


def wait_for(settings, predicate, timeout: float, service: ServeWithWorker, poll_s: float = 0.1):
    return harness.wait_jobs(settings.effective_database_url, predicate, timeout, service.logs, poll_s=poll_s,
                             stages=True)


def _stages(settings, job_id: int) -> tuple:
    return {j.id: j.stages for j in harness.job_rows(settings.effective_database_url, stages=True)}[job_id]


def _synthesizing(study_count: int):
    """The id of job number ``study_count`` once its synthesize stage is running, else None."""
    def pred(rows):
        if len(rows) < study_count:
            return None
        j = rows[study_count - 1]
        return j.id if j.current_stage == "synthesize" and j.stages and j.stages[-1][:2] == ("synthesize", "running") else None
    return pred


def _done(job_id: int):
    def pred(rows):
        for j in rows:
            if j.id == job_id and j.state in ("done", "failed", "poisoned", "input_missing", "cancelled"):
                return (j.state, j.error)
        return None
    return pred


def _delivered_once(orthanc: OrthancServer, settings, job_ids: list[int]) -> None:
    """Orthanc holds exactly the objects of ``job_ids``, each C-STORE'd once."""
    from sqlalchemy import select

    from common.jobstore.db import session_scope
    from common.jobstore.models import Delivery, DeliveryState

    with session_scope(settings.effective_database_url) as s:
        rows = s.scalars(select(Delivery).where(Delivery.job_id.in_(job_ids))).all()
        ours = {r.sop_instance_uid for r in rows}
        assert rows and all(r.state == DeliveryState.SENT for r in rows)
    in_pacs = {httpx.get(f"{orthanc.url}/instances/{oid}/simplified-tags", timeout=10).json()["SOPInstanceUID"]
               for oid in orthanc.instances()}
    assert in_pacs == ours
    assert orthanc.changes_new_instances() == len(ours)
    assert orthanc.store_requests(settings.push_calling_aet) == (len(ours), 0)


@pytest.mark.slow
@pytest.mark.integration
def test_killed_worker_pool_and_serve_recover(tmp_path, redis_url, model_ref):  # noqa: F811
    studies = [write_phantom(tmp_path / f"phantom{i}", seed=5 + i, vendor="siemens", matrix=64)[1] for i in range(2)]
    orthanc = OrthancServer(tmp_path / "orthanc")
    broker = PrivateRedis(tmp_path / "redis", redis_url)
    svc = ServeWithWorker(tmp_path / "svc", broker.start(), orthanc, model_ref)
    try:
        orthanc.start()
        svc.start_serve()
        main = svc.wait_ready()
        settings = svc.settings

        # 1. the worker's main process dies during synthesis; serve restarts it, the lease expires
        storescu(studies[0], svc.scp_port)
        job1 = wait_for(settings, _synthesizing(1), 300, svc)
        os.kill(main, signal.SIGKILL)
        state, err = wait_for(settings, _done(job1), RECOVERY_BOUND_S + 120, svc, poll_s=0.5)
        assert state == "done", err
        stages = _stages(settings, job1)
        lost = [st for st in stages if st[0] == "synthesize" and st[1] == "failed"]
        assert len(lost) == 1 and lost[0][2].startswith("worker lost"), stages
        assert [st[1] for st in stages if st[0] == "synthesize"][-1] == "done"
        _delivered_once(orthanc, settings, [job1])

        # 2. only the pool process dies during synthesis; the replacement takes the job over
        main = svc.wait_ready()
        children = svc.pool_children(main)
        assert len(children) == 1, children
        storescu(studies[1], svc.scp_port)
        job2 = wait_for(settings, _synthesizing(2), 300, svc)
        os.kill(svc.pool_children(main)[0], signal.SIGKILL)
        state, err = wait_for(settings, _done(job2), RECOVERY_BOUND_S + 120, svc, poll_s=0.5)
        assert state == "done", err
        assert svc.worker_main() == main  # the same main process; a new pool process did the work
        stages = _stages(settings, job2)
        assert [st[1] for st in stages if st[0] == "synthesize"] == ["failed", "done"], stages
        _delivered_once(orthanc, settings, [job1, job2])

        # 3. a second serve on the same data dir is refused; SIGKILL of serve leaves no orphan
        second = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--config", str(svc.config), "--no-api",
                                 "--port", str(free_port())], env=svc.env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "another serve runs" in second.stderr, second.stderr
        before = celery_processes(svc.config)
        assert len(before) == 2, before  # main + one pool process
        os.kill(svc.serve.pid, signal.SIGKILL)
        svc.serve.wait(10)
        deadline = time.monotonic() + 30
        while celery_processes(svc.config) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert celery_processes(svc.config) == {}, "worker orphaned by SIGKILL of serve"
        svc.start_serve()
        main = svc.wait_ready()
        after = celery_processes(svc.config)
        assert set(after) == {main, *svc.pool_children(main)} and len(after) == 2, after
        assert after[main] == svc.serve.pid
    finally:
        svc.stop()
        orthanc.stop()
        broker.stop()
