"""The receiver's statuses, duplicate handling and spool discipline, without a network. The tests
that record into the job store run on SQLite and on PostgreSQL (``jobstore_url`` in tests/conftest.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from common.jobstore.db import session_scope
from common.jobstore.models import Instance, ScpEvent, Series, Study
from common.jobstore.queries import init_db
from service.ingest import receiver as R
from service.ingest.dataset import Header
from service.ingest.spool import TEMP_PREFIX, Spool
from service.scp.contexts import STORAGE_SOP_CLASSES

TS = str(ExplicitVRLittleEndian)


def make_ds(study: str, series: str, sop: str | None = None, **extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "MR"
    ds.PatientID = "P1"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def encode(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.fixture
def rx(tmp_path: Path, jobstore_url: str) -> R.Receiver:
    init_db(jobstore_url)
    return R.Receiver(jobstore_url, Spool(tmp_path / "spool", fsync=True), frozenset(STORAGE_SOP_CLASSES))


def _final_files(rx: R.Receiver) -> list[Path]:
    return [p for p in rx.spool.root.rglob("*") if p.is_file()]


def _send(rx: R.Receiver, ds: Dataset, data: bytes | None = None) -> R.Outcome:
    return rx.receive(encode(ds) if data is None else data, TS, str(ds.SOPClassUID), str(ds.SOPInstanceUID), "SCANNER")


def test_stored_file_is_the_received_bytes_with_file_meta(rx: R.Receiver) -> None:
    ds = make_ds(generate_uid(), generate_uid(), InstanceNumber=3)
    raw = encode(ds)
    out = _send(rx, ds, raw)
    assert out.status == R.SUCCESS and not out.duplicate
    path = rx.spool.root / f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    blob = path.read_bytes()
    assert blob.endswith(raw)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == TS
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "SCANNER"
    assert back.PixelData == ds.PixelData and back.InstanceNumber == 3
    with session_scope(rx.database_url) as s:
        row = s.query(Instance).one()
        assert row.path == out.relpath and row.size_bytes == len(blob) and row.calling_aet == "SCANNER"


def test_identical_duplicate_is_idempotent_and_conflict_is_logged(rx: R.Receiver) -> None:
    study, series = generate_uid(), generate_uid()
    ds = make_ds(study, series)
    assert _send(rx, ds).status == R.SUCCESS
    again = _send(rx, ds)
    assert again.status == R.SUCCESS and again.duplicate and not again.conflict
    first_bytes = (rx.spool.root / again.relpath).read_bytes()  # type: ignore[operator]
    changed = make_ds(study, series, sop=str(ds.SOPInstanceUID), PatientID="OTHER")
    conflict = _send(rx, changed)
    assert conflict.status == R.SUCCESS and conflict.conflict
    assert (rx.spool.root / conflict.relpath).read_bytes() == first_bytes  # type: ignore[operator]
    with session_scope(rx.database_url) as s:
        assert s.query(Instance).count() == 1
        events = s.query(ScpEvent).all()
        assert [e.kind for e in events] == ["conflict"]
    assert rx.stats.stored == 1 and rx.stats.duplicates == 2 and rx.stats.conflicts == 1


@pytest.mark.parametrize(
    "case,status",
    [
        ("non_dicom", R.CANNOT_UNDERSTAND),
        ("truncated", R.CANNOT_UNDERSTAND),
        ("missing_study", R.MISSING_UID),
        ("path_chars", R.INVALID_UID),
        ("class_mismatch", R.DATASET_MISMATCH),
        ("unsupported_class", R.SOP_CLASS_NOT_SUPPORTED),
    ],
)
def test_bad_input_gets_a_failure_status_and_leaves_no_file(rx: R.Receiver, case: str, status: int) -> None:
    study, series = generate_uid(), generate_uid()
    ds = make_ds(study, series)
    rq_class, rq_inst = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    data = encode(ds)
    if case == "non_dicom":
        data = b"this is a PDF, not DICOM " * 50
    elif case == "truncated":
        data = data[:-10]
    elif case == "missing_study":
        del ds.StudyInstanceUID
        data = encode(ds)
    elif case == "path_chars":
        ds.SeriesInstanceUID = "../../../tmp/evil"
        data = encode(ds)
    elif case == "class_mismatch":
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT in the data set, MR in the request
        data = encode(ds)
    elif case == "unsupported_class":
        rq_class = "1.2.3.4.5.6"
    out = rx.receive(data, TS, rq_class, rq_inst, "SCANNER", "127.0.0.1:1")
    assert out.status == status, out.reason
    assert _final_files(rx) == []
    with session_scope(rx.database_url) as s:
        assert s.query(Instance).count() == 0
        ev = s.query(ScpEvent).one()
        assert ev.kind == "store_failed" and f"0x{status:04X}" in (ev.reason or "")
    # The receiver keeps working after a bad instance.
    good = make_ds(study, generate_uid())
    assert _send(rx, good).status == R.SUCCESS


def test_out_of_range_header_values_are_stored_alike_on_every_database(rx: R.Receiver) -> None:
    """Senders break VR limits (descriptions longer than LO's 64 characters, NUL padding inside a
    value, IS beyond 2**31 - 1). SQLite would keep anything, PostgreSQL refuses text longer than the
    column, NUL characters and integers out of range: the instance must be stored either way, with
    the same row on both."""
    long = "Perfusion " * 40  # 400 characters; the text columns hold 200
    ds = make_ds(generate_uid(), generate_uid())
    data = encode(ds)
    # Byte-level values pydicom would refuse to write: NUL inside, IS out of range, over-long strings.
    extra = {
        (0x0008, 0x0020): ("DA", b"20300102\x0020300103"),  # a NUL inside a value
        (0x0008, 0x0050): ("SH", b"A" * 80),
        (0x0008, 0x0060): ("CS", b"MR_WITH_A_LONG_CODE_STRING"),
        (0x0008, 0x1030): ("LO", long.encode()),
        (0x0008, 0x103E): ("LO", long.encode()),
        (0x0010, 0x0010): ("PN", b"Doe^" + b"J" * 300),
        (0x0010, 0x0020): ("LO", b"P" * 70 + b"\x00\x00X"),
        (0x0020, 0x0011): ("IS", b"99999999999 "),  # > 2**31 - 1: not a valid IS
        (0x0020, 0x0013): ("IS", b"2147483648"),  # 2**31
        (0x0020, 0x1002): ("IS", b"2147483647"),  # declared size: fits, but its product must too
        (0x0020, 0x0105): ("IS", b"4"),
    }
    data = _with_elements(data, extra)
    out = _send(rx, ds, data)
    assert out.status == R.SUCCESS, out.reason
    with session_scope(rx.database_url) as s:
        study = s.query(Study).one()
        series = s.query(Series).one()
        assert len(study.study_description) == 200 and study.study_description == long[:200]
        assert study.patient_name == ("Doe^" + "J" * 300)[:200]
        assert study.patient_id == ("P" * 70 + "X")[:64]
        assert study.accession_number == "A" * 64
        assert study.study_date == "2030010220300103"
        assert series.modality == "MR_WITH_A_LONG_CODE_STRING"[:16]
        assert series.series_description == long[:200]
        assert series.series_number is None and series.expected_instances == 2**31 - 1
        assert s.query(Instance).one().instance_number is None


def _with_elements(data: bytes, elements: dict[tuple[int, int], tuple[str, bytes]]) -> bytes:
    """Explicit VR little endian ``data`` with ``elements`` (tag -> VR, raw value) replaced or inserted
    in tag order, their bytes written as given."""
    import struct

    out, pos, pending = b"", 0, sorted(elements.items())

    def element(tag: tuple[int, int], vr: str, value: bytes) -> bytes:
        if len(value) % 2:
            value += b" "
        return struct.pack("<HH", *tag) + vr.encode() + struct.pack("<H", len(value)) + value

    while pos < len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6].decode()
        if vr in ("OB", "OW", "OF", "SQ", "UT", "UN", "OD", "OL", "OV", "UC", "UR"):
            length, head = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, head = struct.unpack_from("<H", data, pos + 6)[0], 8
        while pending and pending[0][0] < (group, elem):
            out += element(pending[0][0], *pending.pop(0)[1])
        if pending and pending[0][0] == (group, elem):
            out += element(pending[0][0], *pending.pop(0)[1])
        else:
            out += data[pos:pos + head + length]
        pos += head + length
    for tag, (vr, value) in pending:
        out += element(tag, vr, value)
    return out


def test_unrecorded_leftover_is_replaced_and_temp_files_removed(rx: R.Receiver) -> None:
    ds = make_ds(generate_uid(), generate_uid())
    rel = rx.spool.relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    leftover = rx.spool.root / rel
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a file from a crashed run")
    hour_ago = time.time() - 3600  # a young file without a row may be another gateway's store in flight
    os.utime(leftover, (hour_ago, hour_ago))
    (leftover.parent / f"{TEMP_PREFIX}x.dcm.1234").write_bytes(b"partial")
    assert rx.spool.remove_temp_files() == 1
    assert _send(rx, ds).status == R.SUCCESS
    assert leftover.read_bytes().endswith(encode(ds))


def test_declared_images_rules() -> None:
    assert R.declared_images(Header(images_in_acquisition=14)) == 14
    assert R.declared_images(Header(images_in_acquisition=72, number_of_temporal_positions=60)) == 4320
    assert R.declared_images(Header(number_of_frames=39)) == 39
    assert R.declared_images(Header(number_of_frames=39, number_of_temporal_positions=21)) == 819
    assert R.declared_images(Header(number_of_temporal_positions=21)) is None
    assert R.declared_images(Header()) is None
    assert R.declared_images(Header(number_of_frames=2**31 - 1, number_of_temporal_positions=4)) == 2**31 - 1


def test_series_declaration_is_recorded_and_completion_kicked(tmp_path: Path, jobstore_url: str) -> None:
    url = jobstore_url
    init_db(url)
    kicks: list[int] = []
    rx = R.Receiver(url, Spool(tmp_path / "spool"), on_series_complete=lambda: kicks.append(1))
    study, series = generate_uid(), generate_uid()
    for i in range(3):
        assert _send(rx, make_ds(study, series, ImagesInAcquisition=3, InstanceNumber=i + 1)).status == 0
        assert len(kicks) == (1 if i == 2 else 0)
    with session_scope(url) as s:
        assert s.query(Series).one().expected_instances == 3


def test_gateway_recovery_records_complete_leftovers_and_drops_broken_ones(tmp_path: Path) -> None:
    from common.config import load_settings
    from service.gateway import Gateway

    settings = load_settings(data_dir=tmp_path / "d", disk_watermark_mb=0)
    gw = Gateway(settings, lambda _job: None, host="127.0.0.1", port=0)
    study, series = generate_uid(), generate_uid()
    complete, broken = make_ds(study, series), make_ds(study, series)
    for ds, cut in ((complete, None), (broken, -20)):
        path = gw.spool.root / gw.spool.relpath(study, series, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = R.file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), TS, "OLD") + encode(ds)
        path.write_bytes(blob[:cut] if cut else blob)
    (path.parent / f"{TEMP_PREFIX}zz").write_bytes(b"partial")
    assert gw.recover() == {"temp_removed": 1, "recorded": 1}
    files = sorted(p.name for p in gw.spool.root.rglob("*") if p.is_file())
    assert files == [f"{complete.SOPInstanceUID}.dcm"]
    with session_scope(gw.url) as s:
        assert [i.sop_instance_uid for i in s.query(Instance)] == [complete.SOPInstanceUID]


def test_parallel_associations_starting_the_same_series(tmp_path: Path, jobstore_url: str) -> None:
    """Several senders (threads here; two receivers stand for two processes) start one new series
    at the same moment: every instance is stored, one study row, one series row."""
    import threading

    url = jobstore_url
    init_db(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    receivers = [R.Receiver(url, spool), R.Receiver(url, spool)]
    study, series = generate_uid(), generate_uid()
    batches = [[make_ds(study, series, InstanceNumber=10 * t + i) for i in range(10)] for t in range(6)]
    statuses: list[int] = []
    barrier = threading.Barrier(len(batches))

    def send(t: int) -> None:
        barrier.wait()
        for ds in batches[t]:
            statuses.append(_send(receivers[t % 2], ds).status)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(len(batches))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert statuses == [R.SUCCESS] * 60
    with session_scope(url) as s:
        assert s.query(Instance).count() == 60
        assert s.query(Study).count() == 1 and s.query(Series).count() == 1
