"""Upper Layer robustness of the default engine: garbage on the port, association limits, idle
timeout, a sender that aborts, and `synthperf send`/`echo` delivering files byte for byte."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from cli.cmd_echo import echo
from cli.cmd_send import send_paths
from common.jobstore.db import session_scope
from common.jobstore.models import Instance, ScpEvent
from service.ingest.dataset import split_part10
from tests.integration.test_scp_realdata import dicom_files, gateway_settings, running_gateway

pytestmark = pytest.mark.integration


def _assoc(port: int, title: str = "SYNTHPERF"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=title)


def test_garbage_and_aborts_do_not_hurt_the_server(tmp_path: Path) -> None:
    with running_gateway(gateway_settings(tmp_path / "d")) as gw:
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x01\x00\xff\xff\xff\xff" + b"x" * 64, b"\x04"):
            with socket.create_connection(("127.0.0.1", gw.scp.port), timeout=5) as s:
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                try:
                    s.recv(1024)
                except (ConnectionResetError, TimeoutError):
                    pass
        assoc = _assoc(gw.scp.port)
        assert assoc.is_established
        assoc.abort()
        ok, msg = echo("127.0.0.1", gw.scp.port, called_aet="SYNTHPERF")
        assert ok, msg


def test_association_limit_and_idle_timeout(tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path / "d", max_associations=1, network_timeout_s=1.0)
    with running_gateway(settings) as gw:
        first = _assoc(gw.scp.port)
        assert first.is_established
        second = _assoc(gw.scp.port)
        assert second.is_rejected
        assert (second.acceptor.primitive.result, second.acceptor.primitive.result_source,
                second.acceptor.primitive.diagnostic) == (2, 3, 2)
        # The idle association is closed by the server after network_timeout_s.
        deadline = time.monotonic() + 10
        while gw.scp.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gw.scp.active_associations == 0
        first.abort()
        third = _assoc(gw.scp.port)
        assert third.is_established
        third.release()
    with session_scope(settings.effective_database_url) as s:
        assert s.query(ScpEvent).filter(ScpEvent.kind == "rejected").count() == 1


def test_send_command_delivers_files_byte_for_byte(tmp_path: Path, realdata: Path) -> None:
    folders = [realdata / "dcm_qa_ts" / "ts3_explicit_be", realdata / "dcm_qa_ts" / "ts7_jpegls_gdcm",
               realdata / "dicom2nifti" / "generic_compressed_j2k_001", realdata / "dcm_qa_xa30" / "11_DWI_ADC"]
    settings = gateway_settings(tmp_path / "d")
    with running_gateway(settings) as gw:
        counts = send_paths(folders, "127.0.0.1", gw.scp.port, called_aet="SYNTHPERF")
    files = [f for folder in folders for f in dicom_files(folder)]
    assert counts == {"sent": len(files), "failed": 0, "skipped": 0}
    with session_scope(settings.effective_database_url) as s:
        paths = {i.sop_instance_uid: i.path for i in s.query(Instance)}
    assert len(paths) == len(files)
    import pydicom

    for f in files:
        src = f.read_bytes()
        sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        dst = (settings.spool_dir / paths[sop]).read_bytes()
        ts_src, off_src, _ = split_part10(src)
        ts_dst, off_dst, _ = split_part10(dst)
        assert ts_src == ts_dst and src[off_src:] == dst[off_dst:], f


def test_pdv_length_lies_are_aborted(tmp_path: Path) -> None:
    """A P-DATA-TF whose PDV claims more bytes than the PDU holds gets an A-ABORT, not a hang."""
    with running_gateway(gateway_settings(tmp_path / "d")) as gw:
        assoc = _assoc(gw.scp.port)
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        bad = struct.pack(">I", 1000) + b"\x01\x03" + b"\x00" * 10
        sock.sendall(struct.pack(">BBI", 0x04, 0, len(bad)) + bad)
        deadline = time.monotonic() + 10
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted
        ok, msg = echo("127.0.0.1", gw.scp.port, called_aet="SYNTHPERF")
        assert ok, msg


def test_large_data_sets_spill_to_disk_and_arrive_intact(
    tmp_path: Path, realdata: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above spill_bytes the fast engine keeps the incoming data set in an unnamed file on the
    spool volume (memory stays bounded); what is stored is still the exact bytes sent."""
    import tempfile

    import service.scp.ul as ul
    from service.gateway import Gateway

    spills: list[str] = []
    real_tempfile = tempfile.TemporaryFile

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        spills.append(str(kwargs.get("dir")))
        return real_tempfile(*args, **kwargs)

    monkeypatch.setattr(ul.tempfile, "TemporaryFile", counting)

    settings = gateway_settings(tmp_path / "d")
    gw = Gateway(settings, lambda _job: None, host="127.0.0.1", port=0)
    gw.scp.spill_bytes = 64 * 1024  # every enhanced XA30 file (~0.8 MB) spills
    gw.start()
    folder = realdata / "dcm_qa_xa30" / "10_DWI_b0_b2500"
    try:
        counts = send_paths([folder], "127.0.0.1", gw.scp.port, called_aet="SYNTHPERF")
    finally:
        gw.stop()
    files = dicom_files(folder)
    assert counts["sent"] == len(files) and counts["failed"] == 0
    assert len(spills) == len(files) and set(spills) == {str(settings.spool_dir)}
    with session_scope(settings.effective_database_url) as s:
        paths = [i.path for i in s.query(Instance)]
    assert len(paths) == len(files)

    def dataset_bytes(blob: bytes) -> bytes:
        return blob[split_part10(blob)[1]:]

    stored = {dataset_bytes((settings.spool_dir / p).read_bytes()) for p in paths}
    assert stored == {dataset_bytes(f.read_bytes()) for f in files}
    assert not [p for p in settings.spool_dir.rglob(".tmp-*")]
