"""Find DICOM files under paths and group them into series.

A series is keyed by (SeriesInstanceUID, SeriesNumber), so one series split over folders or
associations is whole again. Real archives re-use one SeriesInstanceUID for copies of the same images
in different transfer syntaxes (dcm_qa_ts differ in SeriesNumber; dicom2nifti's generic_compressed_*
share it too): when the same SOP instance sits in several folders, each folder stays its own series.
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
    if "SOPClassUID" not in ds or "DirectoryRecordSequence" in ds:
        return None
    return ds


def group_series(paths: Iterable[str | Path]) -> list[SeriesFiles]:
    """Read headers of every DICOM file under ``paths`` and group them into series.

    Files are grouped by (SeriesInstanceUID, SeriesNumber), so a series that arrived in several
    folders or associations is one series. Exception: when the same SOP instance appears in several
    folders, the folders hold copies (e.g. one series saved in several transfer syntaxes) and each
    folder stays its own series. Duplicate SOP instances inside a folder are dropped. The order is
    stable (folder, SeriesNumber, UID).
    """
    groups: dict[tuple[str, int | None], list[tuple[Path, Dataset]]] = {}
    for path in iter_files(paths):
        ds = read_header(path)
        if ds is None or "Rows" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        num = ds.get("SeriesNumber")
        num = int(num) if num not in (None, "") else None
        groups.setdefault((uid, num), []).append((path, ds))
    series: list[SeriesFiles] = []
    for (uid, num), items in groups.items():
        folders_of: dict[str, set[Path]] = {}
        for path, ds in items:
            folders_of.setdefault(str(ds.get("SOPInstanceUID", "")), set()).add(path.parent)
        copies = any(len(f) > 1 for f in folders_of.values())
        parts: dict[Path | None, list[tuple[Path, Dataset]]] = {}
        for path, ds in items:
            parts.setdefault(path.parent if copies else None, []).append((path, ds))
        for part in parts.values():
            s = SeriesFiles(folder=part[0][0].parent, series_uid=uid, series_number=num)
            seen: set[str] = set()
            for path, ds in part:
                sop = str(ds.get("SOPInstanceUID", "") or "")
                if sop and sop in seen:
                    continue
                seen.add(sop)
                s.headers.append(ds)
                s.paths.append(path)
                s.frames.extend(frames_of(ds, path))
            series.append(s)
    return sorted(series, key=lambda s: (str(s.folder), s.series_number or 0, s.series_uid))
