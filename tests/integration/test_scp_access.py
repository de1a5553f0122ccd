"""Access control, back-pressure, TLS and bad input over a real association (DCMTK tools and a
pynetdicom SCU that sends crafted bytes raw)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, _config

from common.jobstore.db import session_scope
from common.jobstore.models import Instance, ScpEvent
from service.ingest import receiver as R
from service.status import gateway_status
from tests.conftest import require_tool
from tests.integration.test_scp_realdata import dicom_files, gateway_settings, running_gateway, storescu
from tests.unit.test_ingest_receiver import encode, make_ds

pytestmark = pytest.mark.integration


def echoscu(port: int, *extra: str, aet: str = "ECHOSCU", aec: str = "SYNTHPERF") -> subprocess.CompletedProcess[str]:
    exe = require_tool("echoscu")
    return subprocess.run(
        [exe, "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60,
    )


def _events(url: str, kind: str) -> list[ScpEvent]:
    with session_scope(url) as s:
        return list(s.query(ScpEvent).filter(ScpEvent.kind == kind))


def test_echo_and_called_ae_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = gateway_settings(tmp_path / "d")
    with running_gateway(settings) as gw, caplog.at_level(logging.WARNING, logger="synthperf.scp"):
        assert echoscu(gw.scp.port).returncode == 0
        res = echoscu(gw.scp.port, aec="SOMEONE_ELSE")
        assert res.returncode != 0 and "Called AE Title Not Recognized" in res.stderr
    [ev] = _events(settings.effective_database_url, "rejected")
    assert "SOMEONE_ELSE" in (ev.reason or "") and ev.calling_aet == "ECHOSCU"
    assert any("rejected" in r.getMessage() and "SOMEONE_ELSE" in r.getMessage() for r in caplog.records)


def test_calling_ae_allow_list(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = gateway_settings(tmp_path / "d", allowed_aets=["MODALITY1", "PACS"])
    with running_gateway(settings) as gw, caplog.at_level(logging.WARNING, logger="synthperf.scp"):
        assert echoscu(gw.scp.port, aet="MODALITY1").returncode == 0
        res = echoscu(gw.scp.port, aet="INTRUDER")
        assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stderr
    [ev] = _events(settings.effective_database_url, "rejected")
    assert ev.calling_aet == "INTRUDER" and "allowed_aets" in (ev.reason or "")
    assert any("INTRUDER" in r.getMessage() for r in caplog.records)


def test_peer_network_allow_list(tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path / "d", allowed_networks=["10.0.0.0/8", "fd00::/8"])
    with running_gateway(settings) as gw:
        res = echoscu(gw.scp.port)
        assert res.returncode != 0 and "Rejected" in res.stderr
        assert storescu(gw.scp.port, [tmp_path]).returncode != 0
    evs = _events(settings.effective_database_url, "rejected")
    assert evs and all("127.0.0.1" in (e.reason or "") and "allowed_networks" in (e.reason or "") for e in evs)


def test_disk_watermark_refuses_transiently_and_status_reports_it(tmp_path: Path, realdata: Path) -> None:
    settings = gateway_settings(tmp_path / "d", disk_watermark_mb=10**12)
    with running_gateway(settings) as gw:
        res = echoscu(gw.scp.port)
        assert res.returncode != 0 and "Rejected Transient" in res.stderr
        res = storescu(gw.scp.port, [realdata / "dcm_qa_ts" / "ts1_explicit_le"])
        assert res.returncode != 0
        gw.heartbeat.beat()
        status = gateway_status(settings)
    assert status["disk"]["ok"] is False and status["accepting"] is False
    assert status["recent_rejections"] and "watermark" in status["recent_rejections"][0]["reason"]
    [scp] = [c for c in status["components"] if c["component"] == "scp"]
    assert scp["alive"] and scp["info"]["associations_rejected"] == 2
    with session_scope(settings.effective_database_url) as s:
        assert s.query(Instance).count() == 0
    assert not [p for p in settings.spool_dir.rglob("*") if p.is_file()]


def test_tls_association(tmp_path: Path, realdata: Path) -> None:
    openssl = require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )
    settings = gateway_settings(tmp_path / "d", tls_cert=cert, tls_key=key)
    folder = realdata / "dcm_qa_ts" / "ts1_explicit_le"
    with running_gateway(settings) as gw:
        assert gw.scp.info()["tls"] is True
        ok = echoscu(gw.scp.port, "+tla", "-ic")
        assert ok.returncode == 0, ok.stderr
        sent = storescu(gw.scp.port, [folder], "+tla", "-ic")
        assert sent.returncode == 0, sent.stderr
        assert echoscu(gw.scp.port).returncode != 0  # plain TCP to a TLS port fails
    with session_scope(settings.effective_database_url) as s:
        assert s.query(Instance).count() == len(dicom_files(folder))


def _craft(tmp_path: Path, name: str, dataset_bytes: bytes, sop_uid: str) -> Path:
    """A Part 10 file whose meta is valid and whose data set is ``dataset_bytes`` verbatim."""
    from service.ingest.receiver import file_meta

    path = tmp_path / f"{name}.dcm"
    path.write_bytes(file_meta(str(MRImageStorage), sop_uid, "1.2.840.10008.1.2.1", None) + dataset_bytes)
    return path


def test_bad_input_over_the_network_keeps_the_association_usable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gateway_settings(tmp_path / "d")
    study, series = generate_uid(), generate_uid()
    cases: list[tuple[str, Path, int]] = []
    good = make_ds(study, series)
    good_raw = encode(good)
    cases.append(("truncated", _craft(tmp_path, "trunc", good_raw[:-50], good.SOPInstanceUID), R.CANNOT_UNDERSTAND))
    sop = generate_uid()
    cases.append(("non_dicom", _craft(tmp_path, "junk", b"%PDF-1.7 definitely not DICOM" * 64, sop), R.CANNOT_UNDERSTAND))
    no_uid = make_ds(study, series)
    del no_uid.SeriesInstanceUID
    cases.append(("missing_uid", _craft(tmp_path, "nouid", encode(no_uid), no_uid.SOPInstanceUID), R.MISSING_UID))
    evil = make_ds(study, "1.2.3/../../../../tmp/owned")
    cases.append(("path_chars", _craft(tmp_path, "evil", encode(evil), evil.SOPInstanceUID), R.INVALID_UID))
    other = make_ds(study, series)
    other.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    cases.append(("class_mismatch", _craft(tmp_path, "ct", encode(other), other.SOPInstanceUID), R.DATASET_MISMATCH))
    good_path = _craft(tmp_path, "good", good_raw, good.SOPInstanceUID)

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the crafted bytes as they are
    try:
        with running_gateway(settings) as gw, caplog.at_level(logging.WARNING, logger="synthperf.ingest"):
            ae = AE(ae_title="CRAFTER")
            ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
            ae.add_requested_context("1.2.3.4.5.6.7.8", "1.2.840.10008.1.2.1")  # not a storage class
            assoc = ae.associate("127.0.0.1", gw.scp.port, ae_title="SYNTHPERF")
            assert assoc.is_established
            try:
                assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == ["1.2.3.4.5.6.7.8"]
                for name, path, expected in cases:
                    status = assoc.send_c_store(path)
                    assert status.Status == expected, name
                status = assoc.send_c_store(good_path)
                assert status.Status == 0x0000
            finally:
                assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    failures = [r for r in caplog.records if "store_failed" in r.getMessage()]
    assert len(failures) == len(cases)
    files = [p for p in settings.spool_dir.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].name == f"{good.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(files[0]).PixelData == good.PixelData
    assert not (Path("/tmp") / "owned").exists()
    with session_scope(settings.effective_database_url) as s:
        assert s.query(Instance).count() == 1
        assert s.query(ScpEvent).filter(ScpEvent.kind == "store_failed").count() == len(cases)


@pytest.mark.parametrize("engine", ["fast", "pynetdicom"])
def test_both_engines_store_echo_and_refuse(engine: str, tmp_path: Path, realdata: Path) -> None:
    """The lean engine is the default; the pynetdicom engine stays a working reference."""
    settings = gateway_settings(tmp_path / "d", scp_engine=engine, allowed_aets=["STORESCU", "ECHOSCU"])
    folder = realdata / "dicom2nifti" / "generic_compressed_jpegls_001"
    with running_gateway(settings) as gw:
        assert gw.scp.info()["engine"] == engine
        assert echoscu(gw.scp.port).returncode == 0
        assert echoscu(gw.scp.port, aet="STRANGER").returncode != 0
        res = storescu(gw.scp.port, [folder], "-xt")
        assert res.returncode == 0, res.stderr[-1000:]
    with session_scope(settings.effective_database_url) as s:
        rows = s.query(Instance).all()
        assert len(rows) == len(dicom_files(folder))
        assert {r.transfer_syntax_uid for r in rows} == {"1.2.840.10008.1.2.4.80"}
    assert len(_events(settings.effective_database_url, "rejected")) == 1


def test_mutual_tls_requires_a_client_certificate_signed_by_tls_ca(tmp_path: Path) -> None:
    openssl = require_tool("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60, cwd=tmp_path)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=synthperf test CA")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'localhost' if name == 'server' else 'modality'}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1")
    settings = gateway_settings(tmp_path / "d", tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key",
                                tls_ca=tmp_path / "ca.pem")
    with running_gateway(settings) as gw:
        ok = echoscu(gw.scp.port, "+tls", str(tmp_path / "client.key"), str(tmp_path / "client.pem"),
                     "+cf", str(tmp_path / "ca.pem"))
        assert ok.returncode == 0, ok.stderr
        assert echoscu(gw.scp.port, "+tla", "-ic").returncode != 0  # no client certificate
