"""The structural walker reads every real series and refuses truncated or non-DICOM bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from service.ingest.dataset import MalformedDatasetError, parse_dataset, split_part10
from service.ingest.uids import InvalidUIDError, check_uid, is_valid_uid


def _dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".md", ".gz"))


def test_every_real_file_parses_with_the_same_uids_as_pydicom(realdata: Path) -> None:
    files = _dicom_files(realdata)
    assert len(files) > 200
    for f in files:
        blob = f.read_bytes()
        ts, offset, _meta = split_part10(blob)
        h = parse_dataset(blob[offset:], ts)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert h.sop_instance_uid == ds.SOPInstanceUID, f
        assert h.study_instance_uid == ds.StudyInstanceUID, f
        assert h.series_instance_uid == ds.SeriesInstanceUID, f
        assert h.sop_class_uid == ds.SOPClassUID, f
        nf = ds.get("NumberOfFrames")
        assert h.number_of_frames == (int(nf) if nf is not None else None), f


def test_truncated_data_sets_are_refused(realdata: Path) -> None:
    # One file per transfer syntax family: explicit LE, implicit, big endian, encapsulated, enhanced.
    picks = [
        "dcm_qa_ts/ts1_explicit_le", "dcm_qa_ts/ts2_implicit_le", "dcm_qa_ts/ts3_explicit_be",
        "dcm_qa_ts/ts4_rle", "dcm_qa_ts/ts9_j2k_lossless", "dcm_qa_xa30/11_DWI_ADC",
    ]
    for folder in picks:
        f = _dicom_files(realdata / folder)[0]
        blob = f.read_bytes()
        ts, offset, _ = split_part10(blob)
        for cut in (len(blob) - 1, len(blob) - 7, (offset + len(blob)) // 2, offset + 20):
            with pytest.raises(MalformedDatasetError):
                parse_dataset(blob[offset:cut], ts)


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"])
def test_non_dicom_payloads_are_refused(ts: str) -> None:
    for junk in (b"", b"%PDF-1.4 not dicom at all " * 40, os.urandom(4096), b"\x00" * 3):
        with pytest.raises(MalformedDatasetError):
            parse_dataset(junk, ts)


def test_split_part10_needs_the_dicm_prefix() -> None:
    with pytest.raises(MalformedDatasetError):
        split_part10(b"\x00" * 200)


@pytest.mark.parametrize(
    "uid,ok",
    [
        ("1.2.840.10008.5.1.4.1.1.4", True),
        ("1.2.3.04", True),  # leading zero: tolerated (seen in the wild), still path-safe
        ("../../etc/passwd", False),
        ("1.2.3/4", False),
        ("1.2..3", False),
        ("1.2.3.", False),
        ("", False),
        ("1." + "2" * 70, False),
        ("1.2.3\x00", False),
    ],
)
def test_uid_validation(uid: str, ok: bool) -> None:
    assert is_valid_uid(uid) is ok
    if not ok:
        with pytest.raises(InvalidUIDError):
            check_uid("SOPInstanceUID", uid)
