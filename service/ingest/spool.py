"""The spool: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

A file appears under its final name only complete: bytes go to a hidden temp file in the same
directory, are fsynced, and are then *linked* to the final name. ``link`` (unlike ``rename``)
never replaces an existing file, so two senders racing with the same SOP Instance UID cannot
overwrite each other; the loser learns that the name is taken and the caller decides whether it
is a harmless duplicate or a conflict. After a crash only temp files can be incomplete, and
``remove_temp_files`` deletes them at start-up.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.ingest.uids import check_uid

TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class StoredFile:
    path: Path  # absolute
    relpath: str  # relative to the spool root, as recorded in the job store
    size: int
    created: bool  # False: the final name already existed and nothing was written


class Spool:
    """Atomic, durable writes under the spool root.

    ``fsync`` (default True) makes each file and its directory entry durable before the caller
    answers Success; switching it off trades power-loss safety for speed (a killed process still
    loses nothing: the page cache survives it).
    """

    def __init__(self, root: Path, fsync: bool = True) -> None:
        if not isinstance(root, Path):
            raise TypeError(f"root must be a Path, got {type(root).__name__}")
        self.root = root
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    def relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        check_uid("StudyInstanceUID", study_uid)
        check_uid("SeriesInstanceUID", series_uid)
        check_uid("SOPInstanceUID", sop_uid)
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            if self.fsync:  # make the new directory entries durable too
                for d in (directory.parent, self.root):
                    _fsync_dir(d)
        self._known_dirs.add(directory)

    def store(self, relpath: str, chunks: tuple[bytes, ...]) -> StoredFile:
        """Write ``chunks`` to ``relpath`` atomically; never overwrite an existing file."""
        final = self.root / relpath
        directory = final.parent
        self._ensure_dir(directory)
        tmp = directory / f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            total = sum(len(c) for c in chunks)
            written = os.writev(fd, chunks)  # one system call in the common case
            if written < total:  # short write: finish the rest piece by piece
                rest = memoryview(b"".join(chunks))[written:]
                while rest:
                    n = os.write(fd, rest)
                    rest = rest[n:]
            size = total
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        try:
            os.link(tmp, final)
        except FileExistsError:
            _unlink_quiet(tmp)
            return StoredFile(final, relpath, final.stat().st_size, created=False)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        os.unlink(tmp)
        if self.fsync:
            _fsync_dir(directory)
        return StoredFile(final, relpath, size, created=True)

    def replace(self, relpath: str, chunks: tuple[bytes, ...]) -> StoredFile:
        """Atomically replace whatever sits under ``relpath`` (used for unrecorded leftovers)."""
        final = self.root / relpath
        self._ensure_dir(final.parent)
        tmp = final.parent / f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(4)}"
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(final.parent)
        return StoredFile(final, relpath, final.stat().st_size, created=True)

    def remove_temp_files(self) -> int:
        """Delete leftovers of interrupted writes; return how many were removed."""
        removed = 0
        for path in self.root.glob(f"*/*/{TEMP_PREFIX}*"):
            _unlink_quiet(path)
            removed += 1
        return removed

    def final_files(self) -> Iterator[Path]:
        for path in self.root.glob("*/*/*.dcm"):
            if not path.name.startswith(TEMP_PREFIX):
                yield path


def sha256_of(chunks: tuple[bytes, ...]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
