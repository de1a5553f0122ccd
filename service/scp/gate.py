"""Admission and deadlines for connections to the DICOM port, shared by both network engines.

Why: a TCP connection costs a thread and a slot long before its peer has said who it is, so
counting raw connections against ``max_associations`` lets anyone on an allowed network shut the
port with idle sockets, with one byte every few seconds (a per-read timeout never fires), or
with associations that stop in the middle of a PDU. The gate separates the two phases:

* **pending** (connected, A-ASSOCIATE-RQ not yet answered): a larger cap of its own
  (``max_pending``) and one per peer IP (``max_pending_per_ip``). When either is full, the *oldest*
  pending connection (of that IP, or overall) is closed to make room, so a scanner whose request
  arrives in milliseconds always gets in while an attacker holds every half-open slot; the whole
  handshake (TLS included) has a total deadline (``handshake_timeout_s``).
* **established** (A-ASSOCIATE-AC sent): counted against ``max_associations``. Each PDU has a
  total deadline from its first byte: ``pdu_timeout_s`` plus its bytes at ``min_rate`` bytes/s, so
  a PDU that stops half-way or trickles is cut off while a large fast one is not. When the cap is
  full, an association that is stalled (we are not working for it, nothing has completed for
  ``evict_stalled_s`` and its current PDU, if any, arrives slower than ``min_rate``) is aborted to
  make room for the new request; otherwise the request is refused as before.

Engines report what they see: ``admit`` at accept, ``feed`` with the bytes received (the gate
follows the PDU framing itself), ``busy`` while a message is being processed, ``reserve`` when a
request asks for an association slot and ``release`` at close. A reaper thread enforces the
deadlines by shutting the socket down, which wakes the engine's blocked read. Each kind of event
is logged, at most once per peer IP and kind every ``LOG_EVERY_S`` seconds with a count of
those not logged, so a flood cannot flood the log.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from common.config import Settings

log = logging.getLogger("synthperf.scp.gate")

LOG_EVERY_S = 10.0
MAX_ASSOCIATE_RQ = 1 << 20  # bytes; 128 contexts with 16 transfer syntaxes each need about 70 KB
A_ABORT_PROVIDER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"  # A-ABORT, source service-provider


@dataclass(eq=False)
class Conn:
    """One connection as the gate sees it."""

    ip: str
    peer: str
    sock: socket.socket
    opened: float
    coarse: bool = False  # the engine reports whole PDU reads only (pynetdicom), not each recv
    established: bool = False
    closed: bool = False
    busy: bool = False  # we are processing a message: the peer is waiting for us, not stalling
    quiet_since: float = 0.0  # last completed PDU, or end of our last processing
    pdu_started: float | None = None
    pdu_received: int = 0
    pdu_length: int = 0  # 6 + body length once the header is in; 0 before
    _header: bytearray = field(default_factory=bytearray)
    _body_left: int = 0
    abort_on_kill: bool = True  # send A-ABORT before closing (not on TLS: a second writer is unsafe)

    def begin_pdu(self, now: float) -> None:
        """A coarse engine is about to read a PDU whose first byte has arrived."""
        if self.pdu_started is None:
            self.pdu_started, self.pdu_received = now, 0

    def feed(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Follow the PDU framing over received bytes (any chunking)."""
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self.pdu_started is None:
                self.pdu_started, self.pdu_received = now, 0
            if len(self._header) < 6:
                take = min(6 - len(self._header), n - i)
                self._header += view[i : i + take]
                if len(self._header) == 6:
                    self._body_left = struct.unpack_from(">I", self._header, 2)[0]
                    self.pdu_length = 6 + self._body_left
            else:
                take = min(self._body_left, n - i)
                self._body_left -= take
            i += take
            self.pdu_received += take
            if len(self._header) == 6 and self._body_left == 0:
                self._header.clear()
                self.pdu_started, self.pdu_received, self.pdu_length = None, 0, 0
                self.quiet_since = now

    def pdu_deadline(self, grace_s: float, min_rate: float) -> float | None:
        """When the PDU being received must be complete (None between PDUs)."""
        started = self.pdu_started
        if started is None:
            return None
        earned = self.pdu_length if self.coarse else self.pdu_received
        return started + grace_s + earned / min_rate

    def stalled_for(self, now: float, min_rate: float) -> float:
        """Seconds this association has been holding its slot without progress (0 if it is not)."""
        if self.busy or self.closed:
            return 0.0
        started = self.pdu_started
        if started is not None and now > started and self.pdu_received / (now - started) >= min_rate:
            return 0.0  # a PDU is arriving at a useful rate
        return now - self.quiet_since


class ConnectionGate:
    """Caps, deadlines and eviction for one listening port (see the module docstring)."""

    def __init__(
        self,
        *,
        max_associations: int,
        max_pending: int,
        max_pending_per_ip: int,
        handshake_timeout_s: float,
        pdu_timeout_s: float,
        min_rate: float,
        evict_stalled_s: float,
        reap_every_s: float = 0.2,
    ) -> None:
        for name, value in (("max_associations", max_associations), ("max_pending", max_pending),
                            ("max_pending_per_ip", max_pending_per_ip)):
            if value < 1:
                raise ValueError(f"{name} {value} must be at least 1")
        for name, fvalue in (("handshake_timeout_s", handshake_timeout_s), ("pdu_timeout_s", pdu_timeout_s),
                             ("min_rate", min_rate), ("evict_stalled_s", evict_stalled_s),
                             ("reap_every_s", reap_every_s)):
            if fvalue <= 0:
                raise ValueError(f"{name} {fvalue} must be positive")
        self.max_associations = max_associations
        self.max_pending = max_pending
        self.max_pending_per_ip = max_pending_per_ip
        self.handshake_timeout_s = handshake_timeout_s
        self.pdu_timeout_s = pdu_timeout_s
        self.min_rate = min_rate
        self.evict_stalled_s = evict_stalled_s
        self.reap_every_s = reap_every_s
        self.counts: dict[str, int] = {}  # event kind -> how many (for the heartbeat)
        self._conns: list[Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._reaper = threading.Thread(target=self._reap_loop, name="scp-gate-reaper", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper.is_alive():
            self._reaper.join(timeout=2)

    # ------------------------------------------------------------------ engine hooks
    def admit(self, sock: socket.socket, address: tuple[str, int], *, coarse: bool = False) -> Conn:
        """Register an accepted connection, closing the oldest pending ones over the caps."""
        now = time.monotonic()
        conn = Conn(address[0], f"{address[0]}:{address[1]}", sock, now, coarse=coarse, quiet_since=now)
        victims: list[tuple[Conn, str]] = []
        with self._lock:
            pending = [c for c in self._conns if not c.established]
            same_ip = [c for c in pending if c.ip == conn.ip]
            while len(same_ip) >= self.max_pending_per_ip:
                oldest = same_ip.pop(0)
                pending.remove(oldest)
                victims.append((oldest, f"{self.max_pending_per_ip} connections from {conn.ip} not yet associated "
                                        "(max_pending_per_ip): closed the oldest"))
            while len(pending) >= self.max_pending:
                oldest = pending.pop(0)
                victims.append((oldest, f"{self.max_pending} connections not yet associated (max_pending_connections): "
                                        "closed the oldest"))
            for victim, _why in victims:
                self._drop(victim)
            self._conns.append(conn)
        for victim, why in victims:
            self._kill(victim, "pending_evicted", why, abort=False)
        return conn

    def reserve(self, conn: Conn) -> bool:
        """Take an association slot for ``conn``; aborts the most stalled association when the
        cap is full and one has stalled for ``evict_stalled_s``. False: no slot (refuse)."""
        now = time.monotonic()
        victim = None
        with self._lock:
            if conn.closed:
                return False
            established = [c for c in self._conns if c.established]
            if len(established) >= self.max_associations:
                stalled = max(established, key=lambda c: c.stalled_for(now, self.min_rate))
                stalled_s = stalled.stalled_for(now, self.min_rate)
                if stalled_s < self.evict_stalled_s:
                    return False
                victim = stalled
                self._drop(victim)
            conn.established = True
            conn.quiet_since = now
        if victim is not None:
            self._kill(victim, "association_evicted",
                       f"max_associations ({self.max_associations}) reached: aborted this association, stalled "
                       f"{stalled_s:.1f} s, to admit {conn.peer}", abort=True)
        return True

    def check_first_pdu(self, conn: Conn) -> bool:
        """For an engine that cannot judge a header before reading the body (pynetdicom): close a
        connection whose first PDU announces more than an A-ASSOCIATE-RQ can need. True if closed."""
        if conn.established or conn.pdu_length <= MAX_ASSOCIATE_RQ + 6:
            return False
        with self._lock:
            self._drop(conn)
        self._kill(conn, "protocol_abort", f"first PDU announces {conn.pdu_length - 6} bytes; not a DICOM "
                                           "A-ASSOCIATE-RQ", abort=False)
        return True

    def busy(self, conn: Conn, busy: bool) -> None:
        conn.busy = busy
        if not busy:
            conn.quiet_since = time.monotonic()

    def release(self, conn: Conn) -> None:
        with self._lock:
            self._drop(conn)

    def established_count(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if c.established)

    def pending_count(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if not c.established)

    def note(self, kind: str, ip: str, message: str) -> None:
        """Count an event and log it (throttled per IP and kind)."""
        now = time.monotonic()
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            last, skipped = self._logged.get((kind, ip), (-LOG_EVERY_S, 0))
            if now - last < LOG_EVERY_S:
                self._logged[(kind, ip)] = (last, skipped + 1)
                return
            self._logged[(kind, ip)] = (now, 0)
            if len(self._logged) > 4096:  # forget old entries rather than grow without bound
                self._logged = {k: v for k, v in self._logged.items() if now - v[0] < LOG_EVERY_S}
        more = f" (and {skipped} more like it from {ip} in the last {LOG_EVERY_S:.0f} s)" if skipped else ""
        log.warning("%s: %s%s", kind.replace("_", " "), message, more)

    # ------------------------------------------------------------------ internals
    def _drop(self, conn: Conn) -> None:  # caller holds the lock
        conn.closed = True
        try:
            self._conns.remove(conn)
        except ValueError:
            pass

    def _kill(self, conn: Conn, kind: str, why: str, *, abort: bool) -> None:
        self.note(kind, conn.ip, f"{conn.peer}: {why}")
        try:
            if abort and conn.abort_on_kill:
                conn.sock.settimeout(0.5)
                socket.socket.send(conn.sock, A_ABORT_PROVIDER)
        except OSError:
            pass
        try:
            # The base class method: works on a TLS socket without touching its SSL state, and
            # wakes the engine's thread blocked in recv on this socket.
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.reap_every_s):
            self.reap()

    def reap(self) -> None:
        """Close connections past their handshake or PDU deadline (the reaper thread calls this)."""
        now = time.monotonic()
        expired: list[tuple[Conn, str, str]] = []
        with self._lock:
            for conn in list(self._conns):
                if not conn.established:
                    if now - conn.opened > self.handshake_timeout_s:
                        expired.append((conn, "handshake_timeout",
                                        f"no complete A-ASSOCIATE-RQ within handshake_timeout_s "
                                        f"({self.handshake_timeout_s:g} s)"))
                    continue
                deadline = conn.pdu_deadline(self.pdu_timeout_s, self.min_rate)
                if deadline is not None and now > deadline and not conn.busy:
                    expired.append((conn, "pdu_timeout",
                                    f"PDU not complete {now - (conn.pdu_started or now):.1f} s after its first byte "
                                    f"({conn.pdu_received} bytes; pdu_timeout_s {self.pdu_timeout_s:g} s plus "
                                    f"min_pdu_rate_kib_s)"))
            for conn, _kind, _why in expired:
                self._drop(conn)
        for conn, kind, why in expired:
            self._kill(conn, kind, why, abort=conn.established)


def gate_from_settings(settings: Settings) -> ConnectionGate:
    """The gate configured by the SCP settings."""
    return ConnectionGate(
        max_associations=settings.max_associations,
        max_pending=settings.max_pending_connections,
        max_pending_per_ip=settings.max_pending_per_ip,
        handshake_timeout_s=settings.handshake_timeout_s,
        pdu_timeout_s=settings.pdu_timeout_s,
        min_rate=settings.min_pdu_rate_kib_s * 1024,
        evict_stalled_s=settings.evict_stalled_s,
    )
