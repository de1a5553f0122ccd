"""The spool: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

A file appears under its final name only complete: bytes go to a temp file in the same directory,
are fsynced, and are then *linked* to the final name. ``link`` (unlike ``rename``) never replaces
an existing file, so two senders racing with the same SOP Instance UID cannot overwrite each other;
the loser learns that the name is taken and the caller decides whether it is a harmless duplicate
or a conflict.

On Linux the temp file is *unnamed* (``O_TMPFILE``): it has no directory entry until the link
gives it its final one, so a crash can leave nothing behind and the directory changes once per
instance instead of three times (create, link, unlink), which makes the directory fsync cheaper
(measured here: 0.58-0.70 ms instead of 0.81-0.90 ms for file + directory fsync). Where the
filesystem or the platform lacks it, a hidden named temp file is used, and after a crash
``remove_temp_files`` deletes those at start-up.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.ingest.uids import check_uid

TEMP_PREFIX = ".tmp-"
# What opening an unnamed file answers when the kernel or filesystem has none, and what linking it
# through /proc answers when /proc is missing or refuses: fall back to named temp files for good.
_NO_TMPFILE_OPEN = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS}
_NO_PROC_LINK = {errno.ENOENT, errno.EXDEV, errno.EPERM}


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
        self._unnamed = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")

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
        if self._unnamed:
            stored = self._store_unnamed(final, relpath, chunks)
            if stored is not None:
                if self.fsync and stored.created:
                    _fsync_dir(directory)
                return stored
        tmp = directory / f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            size = self._write_all(fd, chunks)
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

    def _store_unnamed(self, final: Path, relpath: str, chunks: tuple[bytes, ...]) -> StoredFile | None:
        """Write into an unnamed inode of the final directory, then link it to its name.

        None (and named temp files from then on) only when this platform cannot: write errors such
        as a full disk are raised, never taken for a missing feature.
        """
        try:
            fd = os.open(final.parent, os.O_TMPFILE | os.O_WRONLY, 0o640)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE_OPEN:
                raise
            self._unnamed = False
            return None
        try:
            size = self._write_all(fd, chunks)
            try:
                # linkat(..., AT_SYMLINK_FOLLOW) through /proc: os.link uses linkat only when a dir fd
                # is given; with an absolute source path the kernel ignores which fd that is
                os.link(f"/proc/self/fd/{fd}", final, src_dir_fd=fd, follow_symlinks=True)
            except FileExistsError:
                return StoredFile(final, relpath, final.stat().st_size, created=False)
            except OSError as exc:
                if exc.errno not in _NO_PROC_LINK:
                    raise
                self._unnamed = False
                return None
        finally:
            os.close(fd)  # an unlinked inode simply vanishes
        return StoredFile(final, relpath, size, created=True)

    def _write_all(self, fd: int, chunks: tuple[bytes, ...]) -> int:
        """Write every chunk (one writev in the common case), fsync when asked; return the size."""
        total = sum(len(c) for c in chunks)
        written = os.writev(fd, chunks)
        if written < total:  # short write: finish the rest piece by piece
            rest = memoryview(b"".join(chunks))[written:]
            while rest:
                n = os.write(fd, rest)
                rest = rest[n:]
        if self.fsync:
            os.fsync(fd)
        return total

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

    def remove_temp_files(self, older_than_s: float = 0.0) -> int:
        """Delete leftovers of interrupted writes; return how many were removed.

        ``older_than_s`` > 0 spares temp files modified more recently: in a spool shared by several
        gateways (one ReadWriteMany volume) they are another gateway's writes in flight.
        """
        if older_than_s < 0:
            raise ValueError(f"older_than_s must not be negative, got {older_than_s}")
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.root.glob(f"*/*/{TEMP_PREFIX}*"):
            if older_than_s > 0:
                try:
                    if path.stat().st_mtime > cutoff:
                        continue
                except FileNotFoundError:
                    continue
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
