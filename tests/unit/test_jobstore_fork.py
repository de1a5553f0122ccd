"""A process forked from one that uses the job store gets its own connections (common/jobstore/db.py).

Celery's prefork pool forks a replacement pool process from the worker's main process, whose lease
reaper uses the job store. In one make test run the replacement hung for ever before its first job
query and the job was re-queued every 10 s with nothing running it. These tests fork while another
thread of the parent holds the pool's lock (what the reaper's thread does for a moment every round),
and check that the child neither waits for that lock nor reuses the parent's connections. Both run
on SQLite and on PostgreSQL (``jobstore_url`` in tests/conftest.py).

At stop 30 the replacement came up unable to write at all: the fork landed while the main process's
heartbeat or reaper thread was inside a write transaction, and SQLite's per-process lock record told
the child that the write lock was held by one of its own connections, for ever (fork_guard.py). The
last test forks while another thread of the parent is inside a write transaction.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = r"""
import os, sys, threading, time
from sqlalchemy import text
from common.jobstore.db import get_engine, session_scope

url = sys.argv[1]
with session_scope(url) as s:  # the parent has used the store: its pool holds an idle connection
    s.execute(text("select 1"))
engine = get_engine(url)
parent_conn = id(engine.raw_connection().dbapi_connection)  # checked out here, returned below
held, release = threading.Event(), threading.Event()

def hold_the_pool_lock():
    with engine.pool._pool.mutex:  # QueuePool's lock, as during any checkout or check-in
        held.set()
        release.wait()

threading.Thread(target=hold_the_pool_lock, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    with session_scope(url) as s:
        ok = s.execute(text("select 1")).scalar() == 1
    raw = engine.raw_connection()
    fresh = id(raw.dbapi_connection) != parent_conn
    raw.close()
    os._exit(0 if ok and fresh else (3 if ok else 4))
release.set()
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        print({0: "ok", 3: "reused the parent's connection", 4: "query failed"}.get(code, f"exit {code}"))
        sys.exit(0)
    time.sleep(0.1)
os.kill(pid, 9)
print("the child hung on the job store")
"""


def test_forked_child_gets_its_own_pool_and_connections(jobstore_url: str) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, jobstore_url], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok", proc.stdout + proc.stderr[-2000:]


WRITE_DURING_FORK = r"""
import os, sys, threading, time
from sqlalchemy import text
from common.jobstore.db import session_scope

url = sys.argv[1]
sqlite = url.startswith("sqlite")
with session_scope(url) as s:
    s.execute(text("create table if not exists fork_probe (n integer)"))
in_transaction = threading.Event()

def write_slowly():  # what the heartbeat and the reaper do every few seconds, stretched
    with session_scope(url) as s:
        s.execute(text("insert into fork_probe values (1)"))
        in_transaction.set()
        time.sleep(0.5)

writer = threading.Thread(target=write_slowly)
writer.start()
in_transaction.wait()
pid = os.fork()
if pid == 0:
    try:
        with session_scope(url) as s:
            if sqlite:
                s.execute(text("PRAGMA busy_timeout=3000"))  # fail in 3 s, not the store's 30 s
            s.execute(text("insert into fork_probe values (2)"))
    except Exception as exc:
        print("child:", exc, flush=True)
        os._exit(5)
    os._exit(0)
writer.join()
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
with session_scope(url) as s:
    rows = sorted(s.execute(text("select n from fork_probe")).scalars())
print("ok" if code == 0 else f"child exit {code}", rows)
"""


def test_child_forked_during_a_write_transaction_can_write(jobstore_url: str) -> None:
    proc = subprocess.run([sys.executable, "-c", WRITE_DURING_FORK, jobstore_url], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok [1, 2]", proc.stdout + proc.stderr[-2000:]
