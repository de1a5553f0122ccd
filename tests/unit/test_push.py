"""Push: deliveries to a real DICOM listener (pynetdicom SCP on loopback, counting C-STOREs).

Covers: all objects delivered once and byte-identical; a PACS that is down leaves rows pending
with exponential backoff and they complete when it returns; dead-letter after the retry period
and re-push; two concurrent pushers never send an object twice.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from common.config import load_settings
from common.jobstore.db import session_scope
from common.jobstore.models import Delivery, DeliveryState, Job, JobState, Study
from common.jobstore.queries import init_db
from tests.conftest import free_port
from tests.unit.test_encode import make_input
from worker.pipeline.encode import encode_outputs
from worker.pipeline.push import backoff_s, push_due, register_deliveries, repush, utcnow


class CountingSCP:
    """A real Storage SCP that records every C-STORE (dataset bytes by SOP instance UID)."""

    def __init__(self, port: int, ae_title: str = "PACS"):
        self.port = port
        self.ae_title = ae_title
        self.received: list[str] = []
        self.datasets: dict[str, pydicom.Dataset] = {}
        self._server = None
        self._lock = threading.Lock()

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds.SOPInstanceUID)
            self.datasets[ds.SOPInstanceUID] = ds
        return 0x0000

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@pytest.fixture(scope="module")
def encoded_files(tmp_path_factory):
    inp, _ = make_input(False)
    out = tmp_path_factory.mktemp("push_objects")
    result = encode_outputs(inp, out)
    return [(o.sop_instance_uid, o.sop_class_uid, o.path) for o in result.objects]


def job_with_deliveries(settings, files) -> int:
    """A fresh job store with one running job and a pending delivery per file and destination."""
    url = settings.effective_database_url
    init_db(url)
    with session_scope(url) as s:
        study = Study(study_uid="1.2.3.4")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, version=1, state=JobState.RUNNING, trigger="manual")
        s.add(job)
        s.flush()
        register_deliveries(s, job.id, files, settings.destinations)
        return job.id


@pytest.fixture
def setup(data_dir: Path, encoded_files):
    port = free_port()
    settings = load_settings(
        data_dir=data_dir,
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        push_backoff_initial_s=5, push_backoff_max_s=60, push_retry_period_s=3600,
    )
    job_id = job_with_deliveries(settings, encoded_files)
    scp = CountingSCP(port)
    yield settings, job_id, scp
    scp.stop()


def _rows(settings, job_id):
    with session_scope(settings.effective_database_url) as s:
        return s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)).all()


def _job(settings, job_id):
    with session_scope(settings.effective_database_url) as s:
        return s.get(Job, job_id)


def test_backoff_is_exponential_and_capped():
    assert [backoff_s(n, 5, 60) for n in range(1, 6)] == [5, 10, 20, 40, 60]
    with pytest.raises(ValueError, match="attempts"):
        backoff_s(0, 5, 60)


def test_all_objects_delivered_once_and_unchanged(setup, encoded_files):
    settings, job_id, scp = setup
    scp.start()
    report = push_due(settings, job_id)
    assert report.complete and report.sent == len(encoded_files) and report.dead == 0
    assert sorted(scp.received) == sorted(uid for uid, _, _ in encoded_files)
    for uid, _, path in encoded_files:
        ours = pydicom.dcmread(path)
        theirs = scp.datasets[uid]
        assert theirs.SeriesDescription == ours.SeriesDescription
        if "PixelData" in ours:
            assert theirs.PixelData == ours.PixelData
        if "FloatPixelData" in ours:
            assert theirs.FloatPixelData == ours.FloatPixelData
    assert all(r.state == DeliveryState.SENT and r.attempts == 1 for r in _rows(settings, job_id))
    assert _job(settings, job_id).state == JobState.DONE
    # nothing is due any more: a second push sends nothing
    assert push_due(settings, job_id).sent == 0
    assert len(scp.received) == len(encoded_files)


def test_pacs_down_then_back_nothing_lost_nothing_twice(setup, encoded_files):
    settings, job_id, scp = setup
    t0 = utcnow()
    report = push_due(settings, job_id, now=t0)
    assert report.sent == 0 and report.pending == len(encoded_files)
    rows = _rows(settings, job_id)
    assert all(r.attempts == 1 and r.last_error for r in rows)
    assert "PACS@127.0.0.1" in rows[0].last_error
    assert _job(settings, job_id).state == JobState.DELIVERING
    # not due before the backoff has passed
    assert push_due(settings, job_id, now=t0 + timedelta(seconds=1)).failed_attempts == 0
    # second failure doubles the wait
    push_due(settings, job_id, now=utcnow() + timedelta(seconds=6))
    rows = _rows(settings, job_id)
    assert all(r.attempts == 2 for r in rows)
    waits = [(r.next_attempt_at.replace(tzinfo=None) - t0.replace(tzinfo=None)).total_seconds() for r in rows]
    assert min(waits) >= 6 + 10 - 1
    scp.start()
    report = push_due(settings, job_id, now=utcnow() + timedelta(seconds=60))
    assert report.complete and report.sent == len(encoded_files)
    assert sorted(scp.received) == sorted(uid for uid, _, _ in encoded_files)
    assert _job(settings, job_id).state == JobState.DONE


def test_dead_letter_after_period_then_repush(setup, encoded_files):
    settings, job_id, scp = setup
    push_due(settings, job_id)
    later = utcnow() + timedelta(seconds=settings.push_retry_period_s + 1)
    report = push_due(settings, job_id, now=later)
    assert report.dead == len(encoded_files) and report.pending == 0
    job = _job(settings, job_id)
    assert job.state == JobState.FAILED and f"synthperf repush {job_id}" in job.error
    scp.start()
    assert push_due(settings, job_id, now=later + timedelta(days=1)).sent == 0  # dead rows stay dead
    assert repush(settings, job_id) == len(encoded_files)
    report = push_due(settings, job_id)
    assert report.complete and report.sent == len(encoded_files)
    assert _job(settings, job_id).state == JobState.DONE
    assert len(scp.received) == len(encoded_files)


def test_concurrent_pushers_never_send_twice(setup, encoded_files):
    settings, job_id, scp = setup
    scp.start()
    results = []
    threads = [threading.Thread(target=lambda: results.append(push_due(settings, job_id))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(r.sent for r in results) == len(encoded_files)
    assert len(scp.received) == len(encoded_files) == len(set(scp.received))


def test_repush_unknown_job_says_what_to_do(setup):
    settings, _, _ = setup
    with pytest.raises(LookupError, match="synthperf jobs"):
        repush(settings, 999)


def test_register_is_idempotent(setup, encoded_files):
    settings, job_id, _ = setup
    with session_scope(settings.effective_database_url) as s:
        assert register_deliveries(s, job_id, encoded_files, settings.destinations) == 0
    assert len(_rows(settings, job_id)) == len(encoded_files)
    assert np.unique([r.sop_instance_uid for r in _rows(settings, job_id)]).size == len(encoded_files)


def test_push_over_tls(data_dir, encoded_files, tmp_path):
    """A destination with tls=true gets the objects over DICOM TLS, the PACS verified by tls_ca."""
    import ssl
    import subprocess

    from tests.conftest import require_tool

    openssl = require_tool("openssl")
    cert, key = tmp_path / "pacs.pem", tmp_path / "pacs.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    settings = load_settings(data_dir=data_dir, tls_ca=cert,
                             destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": True}])
    init_db(settings.effective_database_url)
    with session_scope(settings.effective_database_url) as s:
        study = Study(study_uid="1.2.3.5")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, version=1, state=JobState.RUNNING, trigger="manual")
        s.add(job)
        s.flush()
        register_deliveries(s, job.id, encoded_files[:3], settings.destinations)
        job_id = job.id
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    scp = CountingSCP(port)
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    scp._server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx,
                                  evt_handlers=[(evt.EVT_C_STORE, scp._on_store)])
    try:
        report = push_due(settings, job_id)
    finally:
        scp.stop()
    assert report.complete and report.sent == 3, report.errors
    assert sorted(scp.received) == sorted(uid for uid, _, _ in encoded_files[:3])


def test_repush_cli_resends_dead_objects_as_stored(setup, encoded_files, monkeypatch, capsys):
    """`synthperf repush JOB --now` revives dead deliveries and sends the stored files again."""
    import json as _json

    from cli.main import main as cli_main

    settings, job_id, scp = setup
    push_due(settings, job_id)
    push_due(settings, job_id, now=utcnow() + timedelta(seconds=settings.push_retry_period_s + 1))
    assert _job(settings, job_id).state == JobState.FAILED
    monkeypatch.setenv("SYNTHPERF_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("SYNTHPERF_DESTINATIONS", _json.dumps(
        [{"ae_title": d.ae_title, "host": d.host, "port": d.port} for d in settings.destinations]))
    scp.start()
    assert cli_main(["repush", str(job_id), "--now"]) == 0
    assert f"job {job_id}: {len(encoded_files)} sent, 0 pending, 0 dead" in capsys.readouterr().out
    assert sorted(scp.received) == sorted(uid for uid, _, _ in encoded_files)
    assert _job(settings, job_id).state == JobState.DONE
    assert cli_main(["repush", "999", "--now"]) == 2
