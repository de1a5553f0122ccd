"""The spool's atomic create: unnamed temp files where Linux has them, named ones elsewhere."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from service.ingest.spool import TEMP_PREFIX, Spool

REL = "1.2.3/1.2.3.4/1.2.3.4.5.dcm"


def watch_directory_during_writes(monkeypatch: pytest.MonkeyPatch, directory: Path) -> list[list[str]]:
    """The names in ``directory`` at each moment bytes are written: what a crash then would leave."""
    seen: list[list[str]] = []
    real_writev = os.writev

    def watching_writev(fd: int, chunks):  # type: ignore[no-untyped-def]
        seen.append(sorted(os.listdir(directory)))
        return real_writev(fd, chunks)

    monkeypatch.setattr(os, "writev", watching_writev)
    return seen


def test_store_creates_once_and_leaves_only_the_final_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.store(REL, (b"head", b"body"))
    assert first.created and first.size == 8
    assert first.path.read_bytes() == b"headbody"
    again = spool.store(REL, (b"other",))
    assert not again.created and again.size == 8
    assert first.path.read_bytes() == b"headbody"  # never overwritten
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["1.2.3.4.5.dcm"]


@pytest.mark.skipif(not hasattr(os, "O_TMPFILE"), reason="no O_TMPFILE on this platform")
def test_unnamed_temp_file_is_used_on_linux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the bytes are written, no temp name exists in the directory."""
    spool = Spool(tmp_path / "spool")
    (tmp_path / "spool" / "1.2.3" / "1.2.3.4").mkdir(parents=True)
    seen = watch_directory_during_writes(monkeypatch, tmp_path / "spool" / "1.2.3" / "1.2.3.4")
    assert spool.store(REL, (b"x" * 100,)).created
    assert seen == [[]]
    assert spool._unnamed


def test_falls_back_to_named_temp_files_when_unnamed_ones_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    real_open = os.open
    tmpfile_flag = getattr(os, "O_TMPFILE", 0)

    def no_tmpfile(path, flags, *args):  # type: ignore[no-untyped-def]
        if tmpfile_flag and flags & tmpfile_flag == tmpfile_flag:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_tmpfile)
    (tmp_path / "spool" / "1.2.3" / "1.2.3.4").mkdir(parents=True)
    seen = watch_directory_during_writes(monkeypatch, tmp_path / "spool" / "1.2.3" / "1.2.3.4")
    stored = spool.store(REL, (b"payload",))
    assert stored.created and stored.path.read_bytes() == b"payload"
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(TEMP_PREFIX)
    assert not spool._unnamed
    assert sorted(p.name for p in stored.path.parent.iterdir()) == ["1.2.3.4.5.dcm"]
    assert not spool.store(REL, (b"other",)).created


def test_other_write_errors_are_raised_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk is the caller's to answer (0xA700), not a reason to switch modes silently."""
    spool = Spool(tmp_path / "spool")

    def full(fd, chunks):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(OSError, match="No space"):
        spool.store(REL, (b"x",))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "spool" / "1.2.3" / "1.2.3.4").iterdir()) == []
