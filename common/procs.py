"""Process supervision helpers: children that die with their parent, one instance per data dir.

``synthperf serve`` starts a Celery worker as a child, and that worker forks pool processes. A
SIGKILL (OOM killer, ``kill -9``) of a parent runs none of its clean-up code, so without help the
children live on as orphans holding gigabytes and the next ``serve`` starts a second worker beside
them. On Linux the kernel can signal a child when its parent dies (``PR_SET_PDEATHSIG``); the pid
file lock refuses a second ``serve`` on the same data directory and disappears with its holder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import multiprocessing
import os
import signal
import socket
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO

log = logging.getLogger("synthperf.procs")

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, expected_ppid: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    Returns False where the platform has no such call; the caller's supervisor must then clean up.
    ``expected_ppid`` closes the race of a parent that died before the call: if we have already
    been re-parented, ``sig`` is sent to ourselves at once.
    """
    if os.uname().sysname != "Linux":
        return False
    ppid = expected_ppid if expected_ppid is not None else os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return False
    except OSError as exc:
        log.warning("prctl not available: %s", exc)
        return False
    if os.getppid() != ppid:  # the parent died between fork and prctl: no signal will come
        os.kill(os.getpid(), sig)
    return True


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def owner_ident() -> str:
    """``host:pid`` of this process: how leases and heartbeats name their holder."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_dead_here(ident: str | None) -> bool:
    """True only when ``ident`` names a process on this host that no longer exists.

    A holder on another host, or a label we cannot parse, is never declared dead here: only its
    lease's expiry can say so.
    """
    if not ident:
        return False
    host, _, rest = ident.rpartition(":")
    pid_text = rest.split()[0] if rest else ""
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    return not pid_alive(int(pid_text))


class InstanceLockError(RuntimeError):
    """Another process holds the instance lock of this data directory; the message names its pid."""


class PidFileLock:
    """An exclusive ``flock`` on ``<folder>/<name>.pid`` holding our pid, for the life of the process.

    The kernel drops the lock when the holder dies however it dies, so a stale file never blocks a
    restart; a live holder makes :meth:`acquire` raise :class:`InstanceLockError`.
    """

    def __init__(self, path: Path) -> None:
        if not str(path):
            raise ValueError("path must name a file")
        self.path = Path(path)
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the process
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise InstanceLockError(f"{self.path} is locked by running process {holder}") from exc
        os.set_inheritable(fh.fileno(), False)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                self._fh.close()
                self._fh = None


def spawned_pool(max_workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers are spawned, not forked.

    A fork copies whatever the caller holds: a Celery/kombu Redis connection left by an earlier task
    or test in the same process deadlocked a forked child in kombu's after-fork clean-up, waiting on
    that socket (``synthperf dataset build`` under make test), and numpy/torch threads do not
    survive a fork either. Spawned workers import what they need afresh.
    """
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"))
