"""Find DICOM files under paths and group them into series.

A series is keyed by (folder, SeriesInstanceUID, SeriesNumber): real archives re-use one
SeriesInstanceUID for copies in different transfer syntaxes (dcm_qa_ts, dicom2nifti) that must not be
pooled, while a spool folder holds exactly one series. Duplicate SOP instances are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from common.dicomio.frames import FrameInfo, frames_of

SKIP_NAMES = {"DICOMDIR"}


@dataclass
class SeriesFiles:
    """Headers (no pixels) and frames of one series."""

    folder: Path
    series_uid: str
    series_number: int | None
    headers: list[Dataset] = field(repr=False, default_factory=list)
    paths: list[Path] = field(default_factory=list)
    frames: list[FrameInfo] = field(repr=False, default_factory=list)

    @property
    def description(self) -> str:
        for ds in self.headers:
            d = str(ds.get("SeriesDescription", "") or "").strip()
            if d:
                return d
        return ""


def iter_files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.name not in SKIP_NAMES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def read_header(path: Path) -> Dataset | None:
    """Header only; None for files that are not DICOM images (DICOMDIR, notes, presentation states)."""
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    if "SOPClassUID" not in ds or "PixelData" in ds.get("DirectoryRecordSequence", []):
        return None
    return ds


def group_series(paths: Iterable[str | Path]) -> list[SeriesFiles]:
    """Read headers of every DICOM file under ``paths`` and group them; order is stable (folder, number)."""
    series: dict[tuple[str, str, int | None], SeriesFiles] = {}
    seen: set[tuple[str, str]] = set()
    for path in iter_files(paths):
        ds = read_header(path)
        if ds is None or "Rows" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        sop = str(ds.get("SOPInstanceUID", "") or "")
        num = ds.get("SeriesNumber")
        num = int(num) if num not in (None, "") else None
        key = (str(path.parent), uid, num)
        if (str(path.parent), sop) in seen and sop:
            continue
        seen.add((str(path.parent), sop))
        s = series.setdefault(key, SeriesFiles(folder=path.parent, series_uid=uid, series_number=num))
        s.headers.append(ds)
        s.paths.append(path)
        s.frames.extend(frames_of(ds, path))
    return sorted(series.values(), key=lambda s: (str(s.folder), s.series_number or 0, s.series_uid))
