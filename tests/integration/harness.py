"""Shared pieces of the integration harnesses that run our service as real processes.

The end-to-end test (test_e2e.py), the dashboard browser test (test_dashboard_browser.py) and the
end-to-end benchmark (bench/e2e.py) all stand up the same world: a real Orthanc as the PACS, a Redis
broker, ``synthperf serve`` and a Celery worker configured by one synthperf.yaml, and DCMTK storescu
as the scanner. Each piece lives here once so that a change to how the service is started or
configured (a new required setting, a different worker command line, Orthanc's environment) is
made in one place and every harness keeps testing the same thing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pydicom
import yaml

from tests.conftest import REPO_ROOT, SHARED_RUNTIME_DIR, free_port, require_tool

ORTHANC = "/usr/sbin/Orthanc"
# Debian's orthanc-dicomweb (QIDO/WADO/STOW-RS under /dicom-web/); loaded when installed
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


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


class OrthancServer:
    """A real Orthanc on loopback ports, its database in ``folder`` (kept across restarts).

    Shared so that every harness talks to a PACS set up the same way: bound to 127.0.0.1 only on
    free ports (parallel runs do not collide, nothing is reachable from outside), no auth, any
    calling AE may store, and TCP_NODELAY=1 in its environment (DCMTK and Orthanc are slow on
    loopback without it, which would distort both the tests' timeouts and the benchmark).
    """

    def __init__(self, folder: Path, aet: str = "ORTHANC", verbose: bool = True, dicom_port: int | None = None) -> None:
        if not Path(ORTHANC).is_file() and not shutil.which("Orthanc"):
            require_tool("Orthanc")
        self.folder = folder
        self.aet = aet
        self.verbose = verbose  # tests read the per-C-STORE log lines; the receive benchmark must not pay for them
        # a DICOM port the caller chose, or one services already point at after a first start, stays
        self.dicom_port_pinned = dicom_port is not None
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self._write_config()
        self.log = folder / "orthanc.log"

    def _write_config(self) -> None:
        folder, aet = self.folder, self.aet
        self.config.write_text(json.dumps({
            "Name": "synthperf-test", "DicomAet": aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "HttpBindAddress": "127.0.0.1", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"), "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],  # DICOMweb
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False, "OverwriteInstances": False,
        }))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (STOW-RS at ``/studies``); needs the plugin (DICOMweb)."""
        if not DICOMWEB_PLUGIN.exists():
            require_tool("orthanc-dicomweb plugin")
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0, port_retries: int = 3) -> None:
        """Start Orthanc and wait for its REST API. A port another process took between our pick and
        Orthanc's bind (nothing can reserve it) makes Orthanc exit at once: then new ports, again."""
        for attempt in range(port_retries + 1):
            log_start = self.log.stat().st_size if self.log.exists() else 0
            try:
                self._start_once(timeout)
                self.dicom_port_pinned = True
                return
            except RuntimeError as exc:
                own_log = self.log.read_text(errors="replace")[log_start:] if self.log.exists() else ""
                if "already in use" not in own_log or attempt == port_retries:
                    raise
                print(f"Orthanc could not bind its ports ({exc}); retrying on new ports", file=sys.stderr)
                self.http_port = free_port()
                if not self.dicom_port_pinned:
                    self.dicom_port = free_port()
                self._write_config()

    def _start_once(self, timeout: float) -> None:
        exe = ORTHANC if Path(ORTHANC).is_file() else shutil.which("Orthanc")
        env = {**os.environ, "TCP_NODELAY": "1"}
        # --verbose: Orthanc logs every C-STORE ("Incoming Store request") and duplicates ("Already stored")
        flags = ["--verbose"] if self.verbose else []
        self.proc = subprocess.Popen([exe, *flags, str(self.config)], env=env, stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def instances(self) -> list[str]:
        return httpx.get(f"{self.url}/instances", timeout=10).json()

    def instance_file(self, orthanc_id: str) -> pydicom.Dataset:
        from io import BytesIO

        data = httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30).content
        return pydicom.dcmread(BytesIO(data))

    def store_requests(self, calling_aet: str) -> tuple[int, int]:
        """(C-STORE requests from ``calling_aet``, duplicates) as Orthanc logged them."""
        text = self.log.read_text(errors="replace")
        return text.count(f"Incoming Store request from AET {calling_aet} "), text.count("Already stored")

    def changes_new_instances(self) -> int:
        """How many NewInstance events Orthanc logged (a duplicate store adds none)."""
        n, since = 0, 0
        while True:
            page = httpx.get(f"{self.url}/changes", params={"since": since, "limit": 1000}, timeout=10).json()
            n += sum(1 for c in page["Changes"] if c["ChangeType"] == "NewInstance")
            since = page["Last"]
            if page["Done"]:
                return n


class PrivateRedis:
    """A real redis-server of our own on a free loopback port.

    Several test suites (and helpers' dev runs) share the Redis of the redis_url fixture and the
    fixed queue names "cpu"/"gpu": a worker of one run would take another run's tasks. A private
    server keeps this run's broker traffic to itself. Falls back to the shared one when the
    redis-server program is not installed.
    """

    def __init__(self, folder: Path, fallback_url: str) -> None:
        self.folder = folder
        self.fallback_url = fallback_url
        self.proc: subprocess.Popen | None = None
        self.url = fallback_url

    def start(self) -> str:
        import redis

        exe = shutil.which("redis-server")
        if not exe:
            return self.url
        self.folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=(self.folder / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
                return self.url
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def service_config(folder: Path, broker_url: str, orthanc: OrthancServer, model: str, scp_port: int,
                   **settings) -> dict:
    """The synthperf settings every harness runs the service with; ``settings`` override or add.

    One builder so that the harnesses agree on what "the service under test" is: loopback SCP,
    fast completion polling, the cheapest sampling (2 DDIM steps, 1 sample, CPU), Orthanc as the
    only destination and short push back-off so that a PACS outage is retried within a test.
    """
    return {
        "data_dir": str(folder / "data"),
        "broker_url": broker_url,
        "scp_host": "127.0.0.1",
        "scp_port": scp_port,
        "stable_age_s": 2.0,
        "completion_poll_s": 0.1,
        "model_name": model,
        "ddim_steps": 2,
        "samples": 1,
        "device": "cpu",
        # one inference-path measurement per machine for all harnesses (keyed by CPU, versions, model)
        "inference_cache_dir": str(SHARED_RUNTIME_DIR),
        "destinations": [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "push_backoff_initial_s": 1.0,
        "push_backoff_max_s": 2.0,
        **settings,
    }


class ServiceProcesses(ProcessGroup):
    """Our service's processes, all configured by ``<folder>/synthperf.yaml`` written from ``cfg``.

    The child environment drops the developer's SYNTHPERF_* variables (they would override the
    file) and adds ``extra_env``; ``spawn`` and ``start_worker`` start process groups that log to
    ``<folder>/<name>.log``. Subclasses decide which processes to start and when they are ready.
    """

    def __init__(self, folder: Path, cfg: dict, **extra_env: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "synthperf.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHPERF_")}
        self.env.update(SYNTHPERF_CONFIG=str(self.config), PYTHONPATH=str(REPO_ROOT), **extra_env)
        self.procs: list[subprocess.Popen] = []

    @property
    def settings(self):
        from common.config import load_settings

        return load_settings(self.config)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=self.env, cwd=REPO_ROOT, stdout=(self.folder / f"{name}.log").open("ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_worker(self) -> subprocess.Popen:
        """One Celery worker on both queues, one child, logging to worker.log."""
        return self.spawn("worker", [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker",
                                     "-Q", "cpu,gpu", "--concurrency", "1", "--loglevel", "INFO",
                                     "--without-gossip", "--without-mingle"])


def storescu(study_dir: Path, port: int) -> None:
    """Send every DICOM file below ``study_dir`` to our SCP on loopback ``port`` as a scanner would
    (calling AE SCANNER, called AE SYNTHPERF), in one storescu association; fails on any error."""
    exe = require_tool("storescu")
    files = [str(f) for f in sorted(study_dir.rglob("*")) if f.is_file() and not f.name.endswith((".json", ".gz"))]
    r = subprocess.run([exe, "-aec", "SYNTHPERF", "-aet", "SCANNER", "127.0.0.1", str(port), *files],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


class JobRow(NamedTuple):
    id: int
    state: str
    current_stage: str | None
    error: str | None
    lease_owner: str | None = None
    #: (name, state, error) of each stage, in order; only when asked for (job_rows(stages=True))
    stages: tuple[tuple[str, str, str | None], ...] = ()


def job_rows(database_url: str, stages: bool = False) -> list[JobRow]:
    """Every job, oldest first (with its stages when ``stages``); [] while the job store does not
    exist yet (the service creates it at start-up). The polling loops of the integration tests read it."""
    from common.jobstore.db import session_scope
    from common.jobstore.models import Job, Stage

    try:
        with session_scope(database_url) as s:
            return [JobRow(j.id, j.state, j.current_stage, j.error, j.lease_owner,
                           tuple((st.name, st.state, st.error)
                                 for st in s.query(Stage).filter_by(job_id=j.id).order_by(Stage.id)) if stages else ())
                    for j in s.query(Job).order_by(Job.id).all()]
    except Exception:  # noqa: BLE001 - the database may not exist yet
        return []


def wait_jobs(database_url: str, predicate: Callable[[list], Any], timeout_s: float,
              logs: Callable[[], str], *, poll_s: float = 0.5, stages: bool = False,
              read: Callable[[str], list] | None = None) -> Any:
    """Poll the jobs until ``predicate(rows)`` returns something truthy, and return that; on timeout fail
    with the last rows and the service's logs (a predicate may raise to fail at once). The rows are
    job_rows's, or what ``read(database_url)`` returns (a test that needs more of each job)."""
    deadline = time.monotonic() + timeout_s
    rows: list = []
    while time.monotonic() < deadline:
        rows = read(database_url) if read else job_rows(database_url, stages)
        hit = predicate(rows)
        if hit:
            return hit
        time.sleep(poll_s)
    shown = [(j.id, j.state, j.current_stage, j.error) for j in rows]
    raise AssertionError(f"timed out after {timeout_s} s; jobs (id, state, stage, error): {shown}\n{logs()}")
