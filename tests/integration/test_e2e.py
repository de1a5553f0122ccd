"""End to end with real parts: storescu -> our SCP -> completion -> Celery worker on Redis ->
pipeline -> C-STORE into a real Orthanc, read back through Orthanc's REST API.

The PACS is down when the results are ready: delivery waits (job "delivering", rows pending with
backoff), Orthanc comes back, delivery completes — every object arrives, none twice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import yaml

from tests.conftest import REPO_ROOT, free_port, require_tool
from tests.integration.harness import ProcessGroup
from tests.integration.test_process import model_ref, write_phantom  # noqa: F401 - fixture re-export

ORTHANC = "/usr/sbin/Orthanc"


class OrthancServer:
    """A real Orthanc on loopback ports, its database in ``folder`` (kept across restarts)."""

    def __init__(self, folder: Path, aet: str = "ORTHANC") -> None:
        if not Path(ORTHANC).is_file() and not shutil.which("Orthanc"):
            require_tool("Orthanc")
        self.folder = folder
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "synthperf-test", "DicomAet": aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "HttpBindAddress": "127.0.0.1", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"), "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "Plugins": [], "StorageCompression": False, "OverwriteInstances": False,
        }))
        self.log = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> None:
        exe = ORTHANC if Path(ORTHANC).is_file() else shutil.which("Orthanc")
        env = {**os.environ, "TCP_NODELAY": "1"}
        # --verbose: Orthanc logs every C-STORE ("Incoming Store request") and duplicates ("Already stored")
        self.proc = subprocess.Popen([exe, "--verbose", str(self.config)], env=env, stdout=self.log.open("ab"),
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


class Service(ProcessGroup):
    """``synthperf serve`` (SCP + completion, no API) and a Celery worker on Redis, as processes."""

    def __init__(self, folder: Path, redis_url: str, orthanc: OrthancServer, model: str, **settings) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.scp_port = free_port()
        cfg = {
            "data_dir": str(folder / "data"),
            "broker_url": redis_url,
            "scp_port": self.scp_port,
            "scp_host": "127.0.0.1",
            "stable_age_s": 2.0,
            "completion_poll_s": 0.1,
            "model_name": model,
            "ddim_steps": 2,
            "samples": 1,
            "device": "cpu",
            "destinations": [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
            "push_backoff_initial_s": 1.0,
            "push_backoff_max_s": 2.0,
            **settings,
        }
        self.config = folder / "synthperf.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHPERF_")}
        self.env["SYNTHPERF_CONFIG"] = str(self.config)
        self.env["PYTHONPATH"] = str(REPO_ROOT)
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        synthperf = [sys.executable, "-m", "cli.main"]
        self.procs.append(subprocess.Popen(
            [*synthperf, "serve", "--config", str(self.config), "--no-api", "--no-worker"], env=self.env,
            cwd=REPO_ROOT, stdout=(self.folder / "serve.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True))
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "-Q", "cpu,gpu",
             "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
            env=self.env, cwd=REPO_ROOT, stdout=(self.folder / "worker.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True))
        echoscu = require_tool("echoscu")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"service process exited; see {self.folder}/*.log:\n{self.logs()}")
            r = subprocess.run([echoscu, "-aec", "SYNTHPERF", "127.0.0.1", str(self.scp_port)],
                               capture_output=True, timeout=10)
            if r.returncode == 0 and " ready." in (self.folder / "worker.log").read_text():
                time.sleep(1.0)  # the pool child finishes worker_process_init (model load) right after
                return
            time.sleep(0.3)
        raise RuntimeError(f"SCP or worker not ready:\n{self.logs()}")


    @property
    def settings(self):
        from common.config import load_settings

        return load_settings(self.config)


def storescu(study_dir: Path, port: int) -> None:
    exe = require_tool("storescu")
    files = [str(f) for f in sorted(study_dir.rglob("*")) if f.is_file() and not f.name.endswith((".json", ".gz"))]
    r = subprocess.run([exe, "-aec", "SYNTHPERF", "-aet", "SCANNER", "127.0.0.1", str(port), *files],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def wait_job(settings, predicate, timeout: float, service: Service):
    from common.jobstore.db import session_scope
    from common.jobstore.models import Job

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with session_scope(settings.effective_database_url) as s:
                jobs = s.query(Job).order_by(Job.id).all()
                last = [(j.id, j.state, j.current_stage, j.error) for j in jobs]
                for j in jobs:
                    if predicate(j):
                        return j.id
        except Exception:  # noqa: BLE001 - the database may not exist yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out; jobs: {last}\n{service.logs()}")


@pytest.mark.slow
@pytest.mark.integration
def test_study_in_results_out_through_a_pacs_outage(tmp_path, redis_url, model_ref):  # noqa: F811
    from sqlalchemy import select

    from common.jobstore.db import session_scope
    from common.jobstore.models import Delivery, DeliveryState, Job, JobState, Stage, StageState

    case, study_dir = write_phantom(tmp_path / "phantom", seed=5, vendor="siemens", matrix=64)
    orthanc = OrthancServer(tmp_path / "orthanc")
    broker = PrivateRedis(tmp_path / "redis", redis_url)
    service = Service(tmp_path / "svc", broker.start(), orthanc, model_ref)
    try:
        orthanc.start()
        orthanc.stop()  # the PACS is down when the results are ready
        service.start()
        storescu(study_dir, service.scp_port)
        settings = service.settings
        job_id = wait_job(settings, lambda j: j.state in (JobState.DELIVERING, *JobState.FINAL), 600, service)
        with session_scope(settings.effective_database_url) as s:
            rows = s.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
            job_state = s.get(Job, job_id).state
            stages = {st.name: st.state for st in s.scalars(select(Stage).where(Stage.job_id == job_id))}
        assert job_state == JobState.DELIVERING, (job_state, service.logs())
        assert all(stages[n] == StageState.DONE for n in ("classify", "load", "core", "synthesize", "measure",
                                                           "encode")), stages
        assert rows and all(r.state == DeliveryState.PENDING for r in rows)
        # wait until at least one retry failed, then bring the PACS back
        wait_job(settings, lambda j: j.id == job_id and _attempts(settings, job_id) >= 2 * len(rows), 60, service)
        orthanc.start()
        wait_job(settings, lambda j: j.id == job_id and j.state in JobState.FINAL, 120, service)
        with session_scope(settings.effective_database_url) as s:
            job = s.get(Job, job_id)
            assert job.state == JobState.DONE, (job.state, job.error)
            rows = s.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
            output_dir = Path(job.output_dir)
        assert all(r.state == DeliveryState.SENT and r.last_status == 0 for r in rows)
        assert all(r.attempts >= 2 for r in rows)  # each waited through the outage
        # nothing lost, nothing twice: Orthanc holds exactly our objects, each stored once
        ours = {r.sop_instance_uid: r.path for r in rows}
        in_pacs = {}
        for oid in orthanc.instances():
            tags = httpx.get(f"{orthanc.url}/instances/{oid}/simplified-tags", timeout=10).json()
            in_pacs[tags["SOPInstanceUID"]] = oid
        assert set(in_pacs) == set(ours)
        assert orthanc.changes_new_instances() == len(ours)
        assert orthanc.store_requests(settings.push_calling_aet) == (len(ours), 0)  # each C-STORE'd once
        # the Tmax map read back through Orthanc equals ours
        tmax_path = output_dir / "dicom" / "tmax.dcm"
        mine = pydicom.dcmread(tmax_path)
        theirs = orthanc.instance_file(in_pacs[mine.SOPInstanceUID])
        np.testing.assert_array_equal(theirs.pixel_array, mine.pixel_array)
        assert theirs.SeriesDescription.startswith("SYNTHETIC")
        assert theirs.StudyInstanceUID == pydicom.dcmread(next(p for p in study_dir.rglob("*") if p.is_file()
                                                               and not p.name.endswith((".json", ".gz"))),
                                                          stop_before_pixels=True).StudyInstanceUID
    finally:
        service.stop()
        orthanc.stop()
        broker.stop()


def _attempts(settings, job_id: int) -> int:
    from sqlalchemy import func, select

    from common.jobstore.db import session_scope
    from common.jobstore.models import Delivery

    with session_scope(settings.effective_database_url) as s:
        return int(s.scalar(select(func.sum(Delivery.attempts)).where(Delivery.job_id == job_id)) or 0)
