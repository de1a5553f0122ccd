"""The gateway replica registry (issue 19): what "several gateway replicas" means, and who may run.

Every gateway (SCP + spool + completion; ``synthperf serve``) holds one row of ``gateway_replicas``
under its ``replica_id`` and renews it every few seconds; a row counts as *live* while it was renewed
within ``lease_s`` and its holder is not a process of this host that no longer exists. Several
replicas are several live rows. The rules, checked at start-up under the job store's migration lock
(a file lock next to a SQLite database, an advisory lock on PostgreSQL), so two gateways starting
together cannot both pass:

* a replica id is held by one process at a time, on any job store: two gateways under one name
  would share a ``serve.pid`` lock file and a registry row;
* on SQLite no second gateway may start at all: SQLite is one file on one node, and the gateway's
  instance writes and the completion claim rely on it being the only writer of that kind there.

PostgreSQL takes several replicas; the completion claim (``service.ingest.completion``) makes each
due study's job once whichever replica sees it first.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update

from common.jobstore.db import session_scope
from common.jobstore.models import GatewayReplica
from common.jobstore.queries import _migration_lock
from common.procs import owner_dead_here, owner_ident

log = logging.getLogger("synthperf.replicas")

# Registrations held by this process (tokens): a row naming our own host:pid with a token not in
# here belongs to an earlier incarnation with the same pid (a container restarted as pid 1).
_OURS: set[str] = set()
_OURS_LOCK = threading.Lock()


class ReplicaConflictError(RuntimeError):
    """This gateway may not start beside the live one(s) named in the message."""


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str
    owner: str
    data_dir: str | None
    seen_s_ago: float


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _token(owner: str) -> str:
    return owner.rpartition(" ")[2] if " " in owner else ""


def _is_live(row: GatewayReplica, now: datetime, lease_s: float) -> bool:
    """Renewed within ``lease_s`` and not held by a dead (or earlier) process of this host."""
    if now - _aware(row.seen_at) > timedelta(seconds=lease_s):
        return False
    if owner_dead_here(row.owner):
        return False
    host_pid = row.owner.split(" ")[0]
    if host_pid == owner_ident():
        with _OURS_LOCK:
            return _token(row.owner) in _OURS  # our pid, another token: only live if this process holds it
    return True


def _describe(row: GatewayReplica, now: datetime) -> str:
    ago = (now - _aware(row.seen_at)).total_seconds()
    name = f"replica {row.replica_id!r}" if row.replica_id else "the unnamed (single) gateway"
    return f"{name} held by {row.owner} (data dir {row.data_dir or '?'}, renewed {ago:.0f} s ago)"


def live_replicas(url: str, lease_s: float, now: datetime | None = None) -> list[ReplicaInfo]:
    """The live gateways, for the system page and logs."""
    now = now or datetime.now(UTC)
    with session_scope(url) as s:
        rows = s.scalars(select(GatewayReplica).order_by(GatewayReplica.replica_id)).all()
        return [ReplicaInfo(r.replica_id, r.owner, r.data_dir, (now - _aware(r.seen_at)).total_seconds())
                for r in rows if _is_live(r, now, lease_s)]


class ReplicaRegistration:
    """This gateway's row: :meth:`register` at start-up (raises :class:`ReplicaConflictError`),
    renewed by a thread every ``renew_s``, removed by :meth:`unregister`."""

    def __init__(self, url: str, replica_id: str, data_dir: str | None, lease_s: float = 30.0,
                 renew_s: float | None = None) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        if len(replica_id) > 64:
            raise ValueError(f"replica_id must be at most 64 characters, got {len(replica_id)}")
        self.url = url
        self.replica_id = replica_id
        self.data_dir = data_dir
        self.lease_s = lease_s
        self.renew_s = renew_s if renew_s is not None else min(5.0, lease_s / 3)
        if not 0 < self.renew_s * 2 <= lease_s:
            raise ValueError(f"renew_s ({self.renew_s}) must be positive and at most half of lease_s ({lease_s})")
        self.owner = f"{owner_ident()} gw-{secrets.token_hex(4)}"
        self.others: list[ReplicaInfo] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, now: datetime | None = None) -> list[ReplicaInfo]:
        """Take this replica id; return the other live replicas. Raises ReplicaConflictError when the id
        is held by a live process, or when the job store is SQLite and another gateway is live."""
        now = now or datetime.now(UTC)
        with _migration_lock(self.url), session_scope(self.url) as s:
            rows = {r.replica_id: r for r in s.scalars(select(GatewayReplica)).all()}
            mine = rows.pop(self.replica_id, None)
            if mine is not None and mine.owner != self.owner and _is_live(mine, now, self.lease_s):
                hint = ("give each replica its own replica_id (SYNTHPERF_REPLICA_ID; the pod name in Kubernetes)"
                        if not is_sqlite(self.url) else "stop it first")
                raise ReplicaConflictError(f"another gateway runs as {_describe(mine, now)}; {hint}")
            live = [r for r in rows.values() if _is_live(r, now, self.lease_s)]
            if live and is_sqlite(self.url):
                raise ReplicaConflictError(
                    "the job store is SQLite and another gateway uses it: "
                    + "; ".join(_describe(r, now) for r in live)
                    + ". SQLite serves one gateway on one node; run several gateway replicas only on a PostgreSQL "
                    "job store (database_url), each with its own replica_id, or stop the other gateway"
                )
            if mine is None:
                s.add(GatewayReplica(replica_id=self.replica_id, owner=self.owner, data_dir=self.data_dir,
                                     started_at=now, seen_at=now))
            else:
                mine.owner, mine.data_dir, mine.started_at, mine.seen_at = self.owner, self.data_dir, now, now
            self.others = [ReplicaInfo(r.replica_id, r.owner, r.data_dir, (now - _aware(r.seen_at)).total_seconds())
                           for r in live]
        with _OURS_LOCK:
            _OURS.add(_token(self.owner))
        return self.others

    def renew(self, now: datetime | None = None) -> bool:
        """Move our row's ``seen_at``; False (and an error logged) when another process took our id."""
        now = now or datetime.now(UTC)
        with session_scope(self.url) as s:
            res = s.execute(update(GatewayReplica)
                            .where(GatewayReplica.replica_id == self.replica_id, GatewayReplica.owner == self.owner)
                            .values(seen_at=now).execution_options(synchronize_session=False))
            if res.rowcount == 1:
                return True
            holder = s.get(GatewayReplica, self.replica_id)
            if holder is None:  # removed behind our back (a restore, a manual clean-up): take it again
                s.add(GatewayReplica(replica_id=self.replica_id, owner=self.owner, data_dir=self.data_dir,
                                     started_at=now, seen_at=now))
                return True
        log.error("replica id %r is now held by %s: two gateways run under one name", self.replica_id, holder.owner)
        return False

    def unregister(self) -> None:
        with session_scope(self.url) as s:
            s.execute(delete(GatewayReplica).where(GatewayReplica.replica_id == self.replica_id,
                                                   GatewayReplica.owner == self.owner))
        with _OURS_LOCK:
            _OURS.discard(_token(self.owner))

    def _run(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a database blip must not stop the renewals
                log.exception("replica renewal failed")

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="replica-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
