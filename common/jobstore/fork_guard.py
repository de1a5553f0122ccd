"""The job store across a fork: no connection in use while this process forks, fresh pools in the child.

Celery's prefork pool forks replacement pool processes from the worker's main process, whose
heartbeat and lease reaper threads write to the job store every few seconds. SQLite keeps a
process-wide record of the locks this process's connections hold (os_unix.c, per database file).
A fork copies that record but not the file locks themselves, so when the fork lands while one of
those threads is inside a write transaction, the child believes "another connection of mine holds
the write lock" for ever: every write of the new pool process waits out the busy timeout and fails
with "database is locked" (make test at stop 30: the replacement's claim of job 2 failed after 30 s
and the job was re-queued every 10 s with nothing able to run it). SQLite's own advice is that no
connection may be carried across a fork; an idle pooled connection is harmless (no lock held), one
in a transaction is not.

:class:`ForkGuard` counts the pool's checked-out connections (a checked-out connection is the only
kind that can hold a transaction) and, from ``os.register_at_fork``'s *before* hook, waits until no
other thread holds one and keeps new check-outs waiting until the fork is done. Connections made
outside an engine (the receiver's raw sqlite3 fast path, common/jobstore/queries.py) are not
counted: that path runs in the gateway, which never forks without exec.

The child also gets a fresh, empty pool in every engine. It inherited the parent's pools: their
connections (one SQLite handle or PostgreSQL socket used from two processes) and their lock, which
a thread of the parent may hold at the moment of the fork and which then stays held in the child for
ever (a replacement pool process once hung before its first job query). SQLAlchemy's answer is
``dispose(close=False)`` in the child, the parent's connections left untouched (kept referenced so
that no finaliser closes them).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from sqlalchemy import Engine, event

log = logging.getLogger("synthperf.jobstore")

#: longest a fork waits for another thread's connection to come back (a hung query must not stop the pool)
FORK_WAIT_S = 30.0


class ForkGuard:
    """Which threads hold a job-store connection; a fork waits until none but the forking thread does."""

    def __init__(self, wait_s: float = FORK_WAIT_S) -> None:
        if wait_s <= 0:
            raise ValueError(f"wait_s must be positive, got {wait_s}")
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._holders: dict[int, int] = {}  # id(connection record) -> thread that checked it out
        self._forking = False
        self._engines: list[Engine] = []
        self._inherited_pools: list[object] = []  # kept referenced and never used in a child

    def watch(self, engine: Engine) -> None:
        """Count ``engine``'s check-outs and check-ins (its pool's events survive ``dispose``), and renew
        its pool in a forked child."""
        self._engines.append(engine)
        event.listen(engine, "checkout", self._checkout)
        event.listen(engine, "checkin", self._checkin)
        event.listen(engine, "detach", self._checkin)

    def _checkout(self, _dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._forking)
            self._holders[id(record)] = threading.get_ident()

    def _checkin(self, _dbapi_conn: Any, record: Any) -> None:
        with self._cond:
            if self._holders.pop(id(record), None) is not None:
                self._cond.notify_all()

    def held_elsewhere(self) -> int:
        """Connections checked out by threads other than this one."""
        me = threading.get_ident()
        with self._cond:
            return sum(1 for thread in self._holders.values() if thread != me)

    def before_fork(self) -> None:
        with self._cond:
            self._forking = True
            me = threading.get_ident()
            if not self._cond.wait_for(lambda: all(t == me for t in self._holders.values()), self.wait_s):
                log.warning("forking while another thread has held a job-store connection for %.0f s: "
                            "the child may find the database locked", self.wait_s)
            elif self._holders:
                log.warning("forking from inside a job-store transaction: the child may find the database locked")

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        """The child starts with no connection checked out, a lock nobody holds and fresh pools."""
        self._cond = threading.Condition()
        self._holders = {}
        self._forking = False
        for engine in self._engines:
            self._inherited_pools.append(engine.pool)
            engine.dispose(close=False)


#: the process's guard, watching every engine that common.jobstore.db makes
FORK_GUARD = ForkGuard()
os.register_at_fork(before=FORK_GUARD.before_fork, after_in_parent=FORK_GUARD.after_fork_in_parent,
                    after_in_child=FORK_GUARD.after_fork_in_child)
