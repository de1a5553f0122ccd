"""A lean DICOM Upper Layer acceptor for the two services the gateway offers: C-STORE and C-ECHO.

Why not pynetdicom for the hot path: pynetdicom's reactors poll with 1 ms sleeps and run a
state machine, event dispatch and logging per PDU; measured here it tops out near 300 C-STOREs/s
with a handler that does nothing, several times below DCMTK storescp. This module reads PDUs with
blocking socket calls in one thread per association and does per message only what the protocol
needs: reassemble the PDVs, decode the few command elements, call the receiver, answer. It
implements PS3.8 for an association *acceptor*: A-ASSOCIATE-RQ/AC/RJ (presentation contexts,
maximum length, implementation class/version; role selection, asynchronous operations, user
identity and extended negotiation items are read and answered by omission, i.e. defaults),
P-DATA-TF, A-RELEASE, A-ABORT, ARTIM/ACSE and network timeouts, optional TLS.

The policy (who may associate, back-pressure, what to store) stays in ScpServer and Receiver;
the same hooks serve the pynetdicom engine, which remains selectable (``scp_engine``).
"""

from __future__ import annotations

import logging
import mmap
import socket
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.scp.access import RJ_LIMIT, Refusal, check_context_ids
from service.scp.gate import MAX_ASSOCIATE_RQ, Conn, ConnectionGate

log = logging.getLogger("synthperf.scp.ul")

Buffer = bytes | mmap.mmap  # a received data set: in memory, or mapped from its spill file

IMPLEMENTATION_CLASS_UID = b"1.2.826.0.1.3680043.10.1460.1"
IMPLEMENTATION_VERSION = b"SYNTHPERF_01"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"

# Presentation context results (PS3.8 9.3.3.2).
PC_ACCEPT, PC_ABSTRACT_NOT_SUPPORTED, PC_TS_NOT_SUPPORTED = 0, 3, 4

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101
UNRECOGNIZED_OPERATION = 0x0211

MAX_COMMAND_SET = 1 << 16  # a C-STORE/C-ECHO command set is a few hundred bytes
# A-ABORT reasons (PS3.8 Table 9-26), source 2 = service-provider
ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 1, 2, 6
_PDU_TYPES = frozenset(range(1, 8))


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol; the association is aborted (A-ABORT ``reason``)."""

    def __init__(self, message: str, reason: int = 0) -> None:
        super().__init__(message)
        self.reason = reason


class PeerGone(Exception):
    """The peer closed the connection or a timeout expired."""


@dataclass
class AssociateRequest:
    called_aet: str
    calling_aet: str
    max_pdu: int = 0
    contexts: list[tuple[int, str, list[str]]] = field(default_factory=list)  # (id, abstract, [ts])
    implementation_class_uid: str = ""


@dataclass
class StoreRequest:
    """What the engine hands the store hook for one C-STORE."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: Buffer  # bytes, or a read-only mmap of a spilled large object (valid during the call)
    calling_aet: str
    peer: str


class Hooks:
    """What the engine asks of its owner (ScpServer implements these)."""

    def check_association(self, called: str, calling: str, address: str) -> Refusal | None: ...
    def association_refused(self, refusal: Refusal, calling: str, peer: str) -> None: ...
    def association_accepted(self, calling: str, peer: str) -> None: ...
    def store(self, request: StoreRequest) -> int: ...
    def supported_transfer_syntaxes(self, abstract_syntax: str) -> tuple[str, ...] | None: ...


def _pad_ae(value: str) -> bytes:
    return value.encode("ascii", errors="replace")[:16].ljust(16, b" ")


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace")


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def parse_associate_rq(body: bytes) -> AssociateRequest:
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ too short")
    called = body[4:20].decode("ascii", errors="replace").strip()
    calling = body[20:36].decode("ascii", errors="replace").strip()
    rq = AssociateRequest(called, calling)
    pos = 68
    while pos + 4 <= len(body):
        itype, _r, ilen = struct.unpack_from(">BBH", body, pos)
        item = body[pos + 4 : pos + 4 + ilen]
        if len(item) != ilen:
            raise ProtocolError("A-ASSOCIATE-RQ item runs past the PDU")
        pos += 4 + ilen
        if itype == 0x20:
            ctx_id = item[0]
            abstract, syntaxes = "", []
            sub = 4
            while sub + 4 <= len(item):
                stype, _r2, slen = struct.unpack_from(">BBH", item, sub)
                value = item[sub + 4 : sub + 4 + slen]
                sub += 4 + slen
                if stype == 0x30:
                    abstract = _uid(value)
                elif stype == 0x40:
                    syntaxes.append(_uid(value))
            rq.contexts.append((ctx_id, abstract, syntaxes))
        elif itype == 0x50:
            sub = 0
            while sub + 4 <= len(item):
                stype, _r2, slen = struct.unpack_from(">BBH", item, sub)
                value = item[sub + 4 : sub + 4 + slen]
                sub += 4 + slen
                if stype == 0x51 and slen == 4:
                    rq.max_pdu = struct.unpack(">I", value)[0]
                elif stype == 0x52:
                    rq.implementation_class_uid = _uid(value)
    return rq


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """Implicit VR LE command set with its group length first."""
    body = b"".join(struct.pack("<HHI", 0, el, len(v)) + v for el, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def decode_command(raw: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(raw):
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        if group != 0:
            raise ProtocolError("command set holds a non-command element")
        out[elem] = raw[pos + 8 : pos + 8 + length]
        pos += 8 + length
    if pos != len(raw):
        raise ProtocolError("truncated command set")
    return out


class Association:
    """One accepted connection, served in its own thread until release, abort or timeout."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], engine: UpperLayerServer,
                 conn: Conn) -> None:
        self.sock = sock
        self.address = address
        self.peer = f"{address[0]}:{address[1]}"
        self.engine = engine
        self.conn = conn  # what the gate knows of this connection (deadlines, slot, progress)
        self.calling_aet = ""
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract syntax, transfer syntax)
        # Our own buffered reader: every received chunk goes through the gate's PDU meter, and a
        # large PDU body is read straight into its final buffer.
        self._buf = bytearray()
        self._pos = 0
        self._scratch = memoryview(bytearray(1 << 18))

    # -------------------------------------------------------------- transport
    def _recv_into(self, view: memoryview) -> int:
        try:
            got = self.sock.recv_into(view)
        except TimeoutError as exc:
            raise PeerGone("timeout") from exc
        except (ConnectionError, OSError, ssl.SSLError, ValueError) as exc:
            raise PeerGone(str(exc)) from exc
        if not got:
            raise PeerGone("connection closed")
        self.conn.feed(view[:got], time.monotonic())
        return got

    def _recv_exact(self, n: int) -> bytes | bytearray:
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= n:
            self._pos = pos + n
            return bytes(buf[pos : pos + n])
        del buf[:pos]
        self._pos = 0
        if n - len(buf) > 1 << 16:  # a large body: read it in place, not through the scratch buffer
            out = bytearray(n)
            have = len(buf)
            out[:have] = buf
            buf.clear()
            view = memoryview(out)
            while have < n:
                have += self._recv_into(view[have:])
            return out
        while len(buf) < n:
            got = self._recv_into(self._scratch)
            buf += self._scratch[:got]
        self._pos = n
        return bytes(buf[:n])

    def _read_pdu(self, handshake: bool = False) -> tuple[int, bytes | bytearray]:
        header = self._recv_exact(6)
        pdu_type, _r, length = struct.unpack(">BBI", header)
        # Judge the header before waiting for a body: garbage must not make us wait for 4 GB.
        if pdu_type not in _PDU_TYPES:
            raise ProtocolError(f"not a DICOM PDU (type 0x{pdu_type:02x})", ABORT_UNRECOGNIZED_PDU)
        if handshake:
            if pdu_type != 0x01:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type}", ABORT_UNEXPECTED_PDU)
            if length > MAX_ASSOCIATE_RQ:
                raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes (we take up to {MAX_ASSOCIATE_RQ})",
                                    ABORT_INVALID_PARAMETER)
        elif pdu_type not in (0x04, 0x05, 0x07):
            raise ProtocolError(f"unexpected PDU type {pdu_type} during the association", ABORT_UNEXPECTED_PDU)
        limit = self.engine.max_pdu
        if limit and pdu_type == 0x04 and length > limit + 64:
            raise ProtocolError(f"P-DATA-TF of {length} bytes exceeds our maximum {limit}", ABORT_INVALID_PARAMETER)
        return pdu_type, self._recv_exact(length) if length else b""

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _send_pdu(self, pdu_type: int, body: bytes) -> None:
        self._send(struct.pack(">BBI", pdu_type, 0, len(body)) + body)

    def _abort(self, source: int = 2, reason: int = 0) -> None:
        try:
            self._send_pdu(0x07, bytes([0, 0, source, reason]))
        except OSError:
            pass

    # -------------------------------------------------------------- association
    def run(self) -> None:
        try:
            # The gate's reaper enforces the total handshake deadline; this only bounds each read.
            self.sock.settimeout(self.engine.gate.handshake_timeout_s)
            _pdu_type, body = self._read_pdu(handshake=True)
            if not self._negotiate(body):
                return
            self.sock.settimeout(self.engine.network_timeout)
            self._serve()
        except PeerGone as exc:
            log.debug("association with %s ended: %s", self.peer, exc)
        except ProtocolError as exc:
            self.engine.gate.note("protocol_abort", self.address[0], f"{self.peer}: {exc}; sent A-ABORT")
            self._abort(reason=exc.reason)
        except Exception:  # noqa: BLE001 - never let one association take the server down
            log.exception("association with %s failed", self.peer)
            self._abort()
        finally:
            self.engine.gate.release(self.conn)
            try:
                self.sock.close()
            except OSError:
                pass

    def _reject(self, refusal: Refusal) -> None:
        result, source, reason = refusal.rsd
        # Account for the refusal first, so that whoever sees the RJ also sees it recorded.
        self.engine.hooks.association_refused(refusal, self.calling_aet, self.peer)
        self._send_pdu(0x03, bytes([0, result, source, reason]))
        # Give the peer a moment to read the RJ and close first (PS3.8: it releases the connection).
        try:
            self.sock.settimeout(2.0)
            while self.sock.recv(4096):
                pass
        except OSError:
            pass

    def _negotiate(self, body: bytes) -> bool:
        rq = parse_associate_rq(body)
        self.calling_aet = rq.calling_aet
        refusal = self.engine.hooks.check_association(rq.called_aet, rq.calling_aet, self.address[0])
        if refusal is None:
            refusal = check_context_ids([c[0] for c in rq.contexts])
        if refusal is None and not self.engine.gate.reserve(self.conn):
            refusal = Refusal(RJ_LIMIT, f"max_associations ({self.engine.max_associations}) reached")
        if refusal is not None:
            self._reject(refusal)
            return False
        items = [_item(0x10, APPLICATION_CONTEXT)]
        for ctx_id, abstract, syntaxes in rq.contexts:
            supported = self.engine.hooks.supported_transfer_syntaxes(abstract)
            if supported is None:
                result, ts = PC_ABSTRACT_NOT_SUPPORTED, syntaxes[0] if syntaxes else IMPLICIT_LE
            else:
                chosen = next((t for t in syntaxes if t in supported), None)
                result, ts = (PC_ACCEPT, chosen) if chosen else (PC_TS_NOT_SUPPORTED, IMPLICIT_LE)
            if result == PC_ACCEPT:
                self.contexts[ctx_id] = (abstract, ts)
            items.append(_item(0x21, bytes([ctx_id, 0, result, 0]) + _item(0x40, ts.encode("ascii"))))
        user = (
            _item(0x51, struct.pack(">I", self.engine.max_pdu))
            + _item(0x52, IMPLEMENTATION_CLASS_UID)
            + _item(0x55, IMPLEMENTATION_VERSION)
        )
        items.append(_item(0x50, user))
        header = struct.pack(">HH", 1, 0) + _pad_ae(rq.called_aet) + _pad_ae(rq.calling_aet) + b"\x00" * 32
        self._send_pdu(0x02, header + b"".join(items))
        self.engine.hooks.association_accepted(rq.calling_aet, self.peer)
        return True

    # -------------------------------------------------------------- DIMSE
    def _serve(self) -> None:
        command = bytearray()
        data_parts: list[bytes] = []
        held = 0
        spill: Any = None
        cmd: dict[int, bytes] | None = None
        ctx_of_cmd = 0
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == 0x04:
                pos = 0
                while pos + 6 <= len(body):
                    length = struct.unpack_from(">I", body, pos)[0]
                    if length < 2 or pos + 4 + length > len(body):
                        raise ProtocolError("malformed presentation data value item")
                    ctx_id, control = body[pos + 4], body[pos + 5]
                    fragment = body[pos + 6 : pos + 4 + length]
                    pos += 4 + length
                    if control & 1:
                        command += fragment
                        if len(command) > MAX_COMMAND_SET:
                            raise ProtocolError(f"command set over {MAX_COMMAND_SET} bytes", ABORT_INVALID_PARAMETER)
                        if control & 2:
                            cmd = decode_command(bytes(command))
                            ctx_of_cmd = ctx_id
                            command.clear()
                            if struct.unpack("<H", cmd.get(0x0800, b"\x01\x01"))[0] == NO_DATASET:
                                self._dispatch(cmd, ctx_of_cmd, None)
                                cmd = None
                    else:
                        if cmd is None:
                            raise ProtocolError("data set fragment without a command")
                        if spill is not None:
                            spill.write(fragment)
                        else:
                            data_parts.append(fragment)
                            held += len(fragment)
                            if held > self.engine.spill_bytes and self.engine.spill_dir is not None:
                                # A large object: keep it on disk, not in memory, until stored.
                                spill = tempfile.TemporaryFile(dir=self.engine.spill_dir, prefix=".tmp-rx-")
                                spill.write(b"".join(data_parts))
                                data_parts.clear()
                        if control & 2:
                            if spill is not None:
                                spill.flush()
                                with mmap.mmap(spill.fileno(), 0, access=mmap.ACCESS_READ) as view:
                                    self._dispatch(cmd, ctx_of_cmd, view)
                                spill.close()
                                spill = None
                            else:
                                self._dispatch(cmd, ctx_of_cmd, b"".join(data_parts))
                            data_parts.clear()
                            held = 0
                            cmd = None
            elif pdu_type == 0x05:
                self._send_pdu(0x06, b"\x00\x00\x00\x00")
                return
            elif pdu_type == 0x07:
                log.info("association with %s aborted by the peer", self.peer)
                return
            else:
                raise ProtocolError(f"unexpected PDU type {pdu_type} during the association")

    def _respond(self, ctx_id: int, elements: list[tuple[int, bytes]]) -> None:
        command = encode_command(elements)
        pdv = struct.pack(">I", len(command) + 2) + bytes([ctx_id, 0x03]) + command
        self._send_pdu(0x04, pdv)

    def _dispatch(self, cmd: dict[int, bytes], ctx_id: int, data: Buffer | None) -> None:
        # While we work the peer waits for our answer: that is not a stall to evict it for.
        self.engine.gate.busy(self.conn, True)
        try:
            self._answer(cmd, ctx_id, data)
        finally:
            self.engine.gate.busy(self.conn, False)

    def _answer(self, cmd: dict[int, bytes], ctx_id: int, data: Buffer | None) -> None:
        field_ = struct.unpack("<H", cmd.get(0x0100, b"\x00\x00"))[0]
        msg_id = cmd.get(0x0110, b"\x00\x00")
        sop_class = _uid(cmd.get(0x0002, b""))
        context = self.contexts.get(ctx_id)
        if context is None:
            raise ProtocolError(f"message on presentation context {ctx_id}, which was not accepted")
        if field_ == C_ECHO_RQ:
            self._respond(ctx_id, [(0x0002, _ui(sop_class)), (0x0100, _us(C_ECHO_RSP)), (0x0120, msg_id),
                                   (0x0800, _us(NO_DATASET)), (0x0900, _us(0))])
            return
        if field_ == C_STORE_RQ and data is not None:
            sop_instance = _uid(cmd.get(0x1000, b""))
            status = self.engine.hooks.store(
                StoreRequest(sop_class, sop_instance, context[1], data, self.calling_aet, self.peer)
            )
            self._respond(ctx_id, [(0x0002, _ui(sop_class)), (0x0100, _us(C_STORE_RSP)), (0x0120, msg_id),
                                   (0x0800, _us(NO_DATASET)), (0x0900, _us(status)),
                                   (0x1000, _ui(sop_instance))])
            return
        self._respond(ctx_id, [(0x0002, _ui(sop_class)), (0x0100, _us(field_ | 0x8000)), (0x0120, msg_id),
                               (0x0800, _us(NO_DATASET)), (0x0900, _us(UNRECOGNIZED_OPERATION))])


class UpperLayerServer:
    """Accepts connections and runs one Association thread each; ``gate`` decides which
    connections may stay and for how long (service/scp/gate.py)."""

    def __init__(
        self,
        hooks: Hooks,
        host: str,
        port: int,
        *,
        gate: ConnectionGate,
        ssl_context: ssl.SSLContext | None = None,
        max_pdu: int = 0,
        network_timeout: float = 60.0,
        spill_dir: Path | None = None,
        spill_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.hooks = hooks
        self.gate = gate
        self.spill_dir = spill_dir  # where data sets above spill_bytes wait (same volume as the spool)
        self.spill_bytes = spill_bytes
        self.ssl_context = ssl_context
        self.max_pdu = max_pdu
        self.network_timeout = network_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(128)
        self.port: int = self._sock.getsockname()[1]
        self._active: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="scp-accept", daemon=True)

    @property
    def max_associations(self) -> int:
        return self.gate.max_associations

    def start(self) -> None:
        self.gate.start()
        self._thread.start()

    def active_count(self) -> int:
        """Established associations (connections still in the handshake are not counted)."""
        return self.gate.established_count()

    def _accept_loop(self) -> None:
        self._sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                sock, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self.gate.admit(sock, address)  # may close older half-open connections
            thread = threading.Thread(target=self._serve, args=(sock, address, conn), name=f"assoc-{address[1]}",
                                      daemon=True)
            with self._lock:
                self._active.add(thread)
            thread.start()

    def _serve(self, sock: socket.socket, address: tuple[str, int], conn: Conn) -> None:
        try:
            if self.ssl_context is not None:
                conn.abort_on_kill = False  # only this thread may write to a TLS connection
                sock.settimeout(self.gate.handshake_timeout_s)
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.gate.note("tls_failed", address[0], f"TLS handshake with {address[0]}:{address[1]} "
                                                             f"failed: {exc}")
                    self.gate.release(conn)
                    sock.close()
                    return
                conn.sock = sock
            Association(sock, address, self, conn).run()
        finally:
            with self._lock:
                self._active.discard(threading.current_thread())

    def stop(self, wait_s: float = 10.0) -> None:
        self._stop.set()
        try:
            self._sock.close()
        except OSError:
            pass
        self._thread.join(timeout=2)
        self.gate.stop()
        with self._lock:
            threads = list(self._active)
        for t in threads:
            t.join(timeout=wait_s)
