"""The pynetdicom engine behind the same connection gate as our own engine (service/scp/gate.py).

pynetdicom's own server counts every connected socket against ``maximum_associations``, wraps
TLS in its accept loop (one slow TLS client stalls every other connection) and reads a PDU with
a per-read timeout, so a peer that trickles bytes is never timed out. Around it, through the
socketserver hooks its AssociationServer inherits (``get_request``, ``process_request``) and the
``request_handler`` it constructs associations with:

* accept returns the plain socket; the gate admits it (closing the oldest half-open connections
  over the pending caps) and TLS is negotiated in the connection's own thread, under the
  handshake deadline;
* each association's ``AssociationSocket.recv`` is wrapped to report the PDUs it reads to the
  gate, whose reaper then enforces the handshake and PDU deadlines by shutting the socket down
  (pynetdicom sees the connection close). pynetdicom reads a PDU whole, so the gate sees its
  progress only per PDU ("coarse"): the deadline counts the PDU's declared length at the minimum
  rate, and at the association cap a PDU still arriving counts as stalled;
* the association cap is checked against established associations only (ScpServer._on_requested
  calls ``gate.reserve``); pynetdicom's own cap is raised above everything the gate lets through.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from service.scp.access import Refusal, check_context_ids
from service.scp.gate import Conn, ConnectionGate
from service.scp.ul import ProtocolError, parse_associate_rq


def conn_of(assoc: Any) -> Conn | None:
    """The gate's record of a pynetdicom association (None for one the gate did not admit)."""
    return getattr(assoc, "_synthperf_conn", None)


class _GatedHandler(RequestHandler):
    """Creates the Association as pynetdicom does, then meters what its socket reads."""

    server: GatedAssociationServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        conn = self.server.take_conn(self.request)
        if conn is None:
            return assoc
        assoc._synthperf_conn = conn
        asock = assoc.dul.socket
        read = asock.recv
        first_pdu: list[bytes] = []  # the A-ASSOCIATE-RQ header while its body is being read

        def metered_recv(nr_bytes: int) -> bytearray:
            # pynetdicom calls recv only once select() saw data: the PDU's first byte is here.
            conn.begin_pdu(time.monotonic())
            data = read(nr_bytes)
            conn.feed(data, time.monotonic())
            if self.server.gate.check_first_pdu(conn):
                return bytearray()  # pynetdicom takes a short read as the connection closing
            if not conn.established and len(first_pdu) < 2:
                first_pdu.append(bytes(data))
                if len(first_pdu) == 2 and first_pdu[0][:1] == b"\x01" and self._refuse_bad_ids(first_pdu[1], conn):
                    return bytearray()
            return data

        asock.recv = metered_recv
        return assoc

    def _refuse_bad_ids(self, body: bytes, conn: Conn) -> bool:
        """pynetdicom cannot even decode an A-ASSOCIATE-RQ with an even context ID (its reactor
        thread dies on it): check the IDs on the raw request and answer A-ASSOCIATE-RJ ourselves."""
        try:
            rq = parse_associate_rq(body)
        except ProtocolError:
            return False  # pynetdicom answers malformed requests itself
        refusal = check_context_ids([c[0] for c in rq.contexts])
        if refusal is None:
            return False
        self.server.on_refused(refusal, rq.calling_aet, conn.peer)
        result, source, reason = refusal.rsd
        try:
            conn.sock.sendall(struct.pack(">BBI", 0x03, 0, 4) + bytes([0, result, source, reason]))
        except OSError:
            pass
        self.server.gate.release(conn)
        return True


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the gate in front (see the module docstring)."""

    gate: ConnectionGate
    on_refused: Callable[[Refusal, str, str], None]  # ScpServer.association_refused

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _GatedHandler
        self._conns: dict[int, Conn] = {}
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        self._tls: ssl.SSLContext | None = self.ssl_context

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Plain accept: TLS happens in the connection's thread (process_request).
        sock, address = self.socket.accept()  # type: ignore[union-attr]
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        conn = self.gate.admit(request, client_address, coarse=True)
        thread = threading.Thread(target=self._serve, args=(request, client_address, conn),
                                  name=f"gated-{client_address[1]}", daemon=True)
        thread.start()

    def _serve(self, request: socket.socket, client_address: Any, conn: Conn) -> None:
        try:
            if self._tls is not None:
                conn.abort_on_kill = False
                request.settimeout(self.gate.handshake_timeout_s)
                try:
                    request = self._tls.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.gate.note("tls_failed", client_address[0],
                                   f"TLS handshake with {client_address[0]}:{client_address[1]} failed: {exc}")
                    self.gate.release(conn)
                    request.close()
                    return
                conn.sock = request
            if self.ae.network_timeout is not None:
                request.settimeout(self.ae.network_timeout)
            with self._conns_lock:
                self._conns[id(request)] = conn
            self.finish_request(request, client_address)  # starts the Association thread
        except Exception:  # noqa: BLE001 - as ThreadedAssociationServer: never take the server down
            self.gate.release(conn)
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def take_conn(self, request: Any) -> Conn | None:
        with self._conns_lock:
            return self._conns.pop(id(request), None)


def _on_conn_close(event: evt.Event) -> None:
    conn = conn_of(event.assoc)
    server = event.assoc._server
    if conn is not None and isinstance(server, GatedAssociationServer):
        server.gate.release(conn)


def start_gated_server(ae: AE, address: tuple[str, int], gate: ConnectionGate, handlers: list[Any],
                       ssl_context: ssl.SSLContext | None,
                       on_refused: Callable[[Refusal, str, str], None]) -> GatedAssociationServer:
    """Start ``ae`` listening behind ``gate`` in a background thread (as ``ae.start_server``
    with ``block=False`` does)."""
    # The gate bounds connections. pynetdicom's own count includes half-open sockets and the
    # threads of connections the gate has closed but pynetdicom has not yet reaped: out of its way.
    ae.maximum_associations = 1 << 20
    server = ae.make_server(address, evt_handlers=[*handlers, (evt.EVT_CONN_CLOSE, _on_conn_close)],
                            ssl_context=ssl_context, server_class=GatedAssociationServer)
    assert isinstance(server, GatedAssociationServer)
    server.gate = gate
    server.on_refused = on_refused
    gate.start()
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer@synthperf", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server
