"""End to end with real parts: storescu -> our SCP -> completion -> Celery worker on Redis ->
pipeline -> C-STORE into a real Orthanc, read back through Orthanc's REST API.

The PACS is down when the results are ready: delivery waits (job "delivering", rows pending with
backoff), Orthanc comes back, delivery completes — every object arrives, none twice.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from tests.conftest import free_port, require_tool
from tests.integration import harness
from tests.integration.harness import OrthancServer, PrivateRedis, ServiceProcesses, service_config, storescu
from tests.integration.test_process import model_ref, write_phantom  # noqa: F401 - fixture re-export


class Service(ServiceProcesses):
    """``synthperf serve`` (SCP + completion, no API) and a Celery worker on Redis, as processes."""

    def __init__(self, folder: Path, redis_url: str, orthanc: OrthancServer, model: str, **settings) -> None:
        self.scp_port = free_port()
        super().__init__(folder, service_config(folder, redis_url, orthanc, model, self.scp_port, **settings))

    def start(self) -> None:
        self.spawn("serve", [sys.executable, "-m", "cli.main", "serve", "--config", str(self.config), "--no-api",
                             "--no-worker"])
        self.start_worker()
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


def wait_job(settings, predicate, timeout: float, service: Service):
    """The id of the first job (a harness.JobRow) that ``predicate`` accepts."""
    return harness.wait_jobs(settings.effective_database_url,
                             lambda rows: next((j.id for j in rows if predicate(j)), None), timeout, service.logs)


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
