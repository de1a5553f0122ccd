"""Hostile connections on the DICOM port, with both engines: a scanner (DCMTK echoscu and
storescu of a real series) gets through while attackers hold every half-open slot (idle
sockets, slowloris) or every association slot (half-sent P-DATA); the server then closes the
attackers by itself; garbage is aborted at once; requests with even or duplicate presentation
context IDs are refused (PS3.8 9.3.2.2: odd integers 1-255, one per proposed context).

Attackers connect to 127.0.0.1 only; some bind their own end to other loopback addresses
(127.0.0.2-5) so that the per-IP and the global pending caps are both exercised. Every loop is
bounded in count and in time. Timings are printed (``-s``) for docs/operations.md, never asserted.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from common.jobstore.db import session_scope
from common.jobstore.models import ScpEvent
from tests.integration.test_scp_access import echoscu
from tests.integration.test_scp_realdata import gateway_settings, running_gateway, storescu

pytestmark = pytest.mark.integration

ENGINES = ["fast", "pynetdicom"]
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
SERIES = ("dicom2nifti", "generic_compressed_jpegls_001")  # storescu proposes its JPEG-LS syntax (-xt)


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(context_ids: list[int], called: str = "SYNTHPERF", calling: str = "ATTACKER") -> bytes:
    """A-ASSOCIATE-RQ proposing Verification on each of ``context_ids`` (PS3.8 9.3.2)."""
    items = _item(0x10, b"1.2.840.10008.3.1.1.1")
    for cid in context_ids:
        items += _item(0x20, bytes([cid, 0, 0, 0]) + _item(0x30, VERIFICATION.encode()) +
                       _item(0x40, IMPLICIT_LE.encode()))
    items += _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32) + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def read_pdu(s: socket.socket, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """The next PDU from the server, or None when it closed the connection."""
    s.settimeout(timeout)
    try:
        header = s.recv(6, socket.MSG_WAITALL)
        if len(header) < 6:
            return None
        kind, _r, length = struct.unpack(">BBI", header)
        return kind, s.recv(length, socket.MSG_WAITALL) if length else b""
    except (ConnectionResetError, BrokenPipeError):
        return None


def closed_by_server(socks: list[socket.socket], within_s: float) -> int:
    """How many of ``socks`` the server closed (EOF, reset or A-ABORT) within ``within_s``."""
    end = time.monotonic() + within_s
    open_ = list(socks)
    while open_ and time.monotonic() < end:
        ready, _, _ = select.select(open_, [], [], 0.2)
        for s in ready:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data or data[0] == 0x07:
                open_.remove(s)
    return len(socks) - len(open_)


def scanner_sends(port: int, realdata: Path) -> float:
    """echoscu, then storescu of a real series; seconds the two took."""
    t0 = time.monotonic()
    echo = echoscu(port)
    assert echo.returncode == 0, echo.stderr[-1000:]
    res = storescu(port, [realdata.joinpath(*SERIES)], "-xt")
    assert res.returncode == 0, res.stderr[-1000:]
    return time.monotonic() - t0


@contextmanager
def attack_sockets() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_scanner_gets_in_while_idle_and_slowloris_connections_hold_every_pending_slot(
        engine: str, tmp_path: Path, realdata: Path) -> None:
    # Caps below the defaults (64, 16) so that pynetdicom, which needs about 0.1 s of CPU to set up
    # each connection here, has admitted them all well within the handshake deadline; the deadline
    # above the default 10 s, which make test's parallel processes on 2 cores once outlasted while the
    # 44 attackers were still connecting.
    settings = gateway_settings(tmp_path / "d", scp_engine=engine, max_pending_connections=32, max_pending_per_ip=8,
                                handshake_timeout_s=25.0)
    cap, per_ip = settings.max_pending_connections, settings.max_pending_per_ip
    stop = threading.Event()
    with running_gateway(settings) as gw, attack_sockets() as idle, attack_sockets() as slow:
        port = gw.scp.port
        # Idle flood: the global cap, from four other loopback addresses (per-IP cap each).
        for i in range(cap):
            idle.append(connect(port, f"127.0.0.{2 + i // per_ip}"))
        # Slowloris from the scanner's own address: 12 sockets trickling an A-ASSOCIATE-RQ.
        rq = associate_rq([1])
        for _ in range(12):
            slow.append(connect(port))

        def trickle() -> None:
            for i in range(60):  # at most 60 bytes each, one every 0.25 s: bounded to 15 s
                if stop.wait(0.25):
                    return
                for s in slow:
                    try:
                        s.send(rq[i : i + 1])
                    except OSError:
                        pass

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        deadline = time.monotonic() + settings.handshake_timeout_s / 2
        while (gw.scp.gate.pending_count() < cap or len(gw.scp.gate.counts) == 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gw.scp.gate.pending_count() == cap  # the attackers hold every half-open slot ...
        assert "handshake_timeout" not in gw.scp.gate.counts  # ... and none has timed out yet
        took = scanner_sends(port, realdata)
        closed = closed_by_server(idle + slow, within_s=settings.handshake_timeout_s + 3)
        stop.set()
        t.join(5)
        counts = dict(gw.scp.gate.counts)
    assert closed == len(idle) + len(slow)
    assert counts.get("pending_evicted", 0) >= len(slow) - per_ip + 2  # over the per-IP cap, and the scanner's two
    assert counts.get("handshake_timeout", 0) > 0
    print(f"\n[{engine}] idle+slowloris: scanner echo+store {took:.2f} s during the attack; "
          f"attackers closed within handshake_timeout_s; events {counts}")


@pytest.mark.parametrize("engine", ENGINES)
def test_scanner_gets_in_while_half_sent_pdata_holds_every_association(
        engine: str, tmp_path: Path, realdata: Path) -> None:
    # The PDU deadline well after evict_stalled_s, so that the scanner's slot comes by eviction. On busy
    # cores (make test runs in parallel) the twelve attackers can take longer than evict_stalled_s to
    # connect (once over 8 s): then the last ones already evict the first ones, and every slot is still
    # an attacker's.
    settings = gateway_settings(tmp_path / "d", scp_engine=engine, evict_stalled_s=3.0, pdu_timeout_s=20.0)
    with running_gateway(settings) as gw, attack_sockets() as attackers:
        port = gw.scp.port
        accepted = 0
        for _ in range(12):
            s = connect(port, "127.0.0.2")
            s.sendall(associate_rq([1]))
            reply = read_pdu(s)
            assert reply is not None
            if reply[0] == 0x02:  # A-ASSOCIATE-AC: now half a P-DATA-TF, then silence
                accepted += 1
                s.sendall(struct.pack(">BBI", 0x04, 0, 1000) + struct.pack(">IBB", 996, 1, 0x03) + bytes(94))
                attackers.append(s)
            else:
                assert reply[0] == 0x03  # over max_associations: A-ASSOCIATE-RJ
                s.close()
        evicted_by_attackers = gw.scp.gate.counts.get("association_evicted", 0)
        assert accepted == settings.max_associations + evicted_by_attackers
        assert gw.scp.active_associations == settings.max_associations  # every slot an attacker's
        t_attack = time.monotonic()
        time.sleep(settings.evict_stalled_s + 0.5)  # let the attackers count as stalled
        took = scanner_sends(port, realdata)
        waited = time.monotonic() - t_attack
        closed = closed_by_server(attackers, within_s=settings.pdu_timeout_s + 3)
        counts = dict(gw.scp.gate.counts)
    assert closed == len(attackers)
    # a slot for echoscu by eviction (storescu reuses it after the release)
    assert counts.get("association_evicted", 0) >= evicted_by_attackers + 1
    assert counts.get("pdu_timeout", 0) > 0
    print(f"\n[{engine}] half-sent P-DATA: scanner echo+store {took:.2f} s, {waited:.2f} s after the attack "
          f"began; events {counts}")


@pytest.mark.parametrize("engine", ENGINES)
def test_garbage_is_aborted_or_closed_at_once(engine: str, tmp_path: Path) -> None:
    rng = random.Random(16)
    noise = bytes([0x5A]) + bytes(rng.randrange(256) for _ in range(255))
    garbage = [
        b"GET / HTTP/1.1\r\nHost: synthperf\r\n\r\n",
        noise,  # random bytes (first byte not a PDU type)
        b"\x01\x00\xff\xff\xff\xf0" + noise,  # an "A-ASSOCIATE-RQ" of 4 GB
        b"\x04\x00\x00\x00\x00\x10" + bytes(16),  # P-DATA-TF before any association
    ]
    # A long handshake deadline: what closes the connection must be the garbage, not the clock.
    settings = gateway_settings(tmp_path / "d", scp_engine=engine, handshake_timeout_s=60.0)
    with running_gateway(settings) as gw:
        for junk in garbage:
            with connect(gw.scp.port) as s:
                s.sendall(junk)
                assert closed_by_server([s], within_s=3.0) == 1, junk[:16]
        ok = echoscu(gw.scp.port)
        assert ok.returncode == 0, ok.stderr[-1000:]


@pytest.mark.parametrize("engine", ENGINES)
def test_even_or_duplicate_presentation_context_ids_are_rejected(engine: str, tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path / "d", scp_engine=engine)
    bad = {
        "200 contexts, even and duplicate IDs": [(2 * i) % 256 for i in range(200)],
        "one even ID": [1, 2],
        "odd but duplicate IDs": [1, 3, 1],
    }
    with running_gateway(settings) as gw:
        for what, ids in bad.items():
            with connect(gw.scp.port) as s:
                s.sendall(associate_rq(ids))
                reply = read_pdu(s)
                assert reply is not None and reply[0] == 0x03, what  # A-ASSOCIATE-RJ
                assert tuple(reply[1][1:4]) == (1, 2, 1), what  # permanent, ACSE provider, no reason given
        with connect(gw.scp.port) as s:  # the same request with proper IDs is accepted
            s.sendall(associate_rq([1, 3]))
            reply = read_pdu(s)
            assert reply is not None and reply[0] == 0x02
            s.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ
            reply = read_pdu(s)
            assert reply is not None and reply[0] == 0x06
    with session_scope(settings.effective_database_url) as db:
        reasons = [e.reason or "" for e in db.query(ScpEvent).filter(ScpEvent.kind == "rejected")]
    assert len(reasons) == len(bad)
    assert all("presentation context IDs" in r for r in reasons)
