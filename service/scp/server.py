"""The SCP that listens for scanners and PACS: policy plus one of two network engines.

``fast`` (default) is our lean Upper Layer (service/scp/ul.py); ``pynetdicom`` is a pynetdicom
AE, kept as the reference engine. Both apply the same policy: association requests pass the
access policy and the disk watermark and are refused with an A-ASSOCIATE-RJ whose reason goes
to the log and to the job store (ScpEvent); C-STORE hands the data set bytes, undecoded, to the
Receiver; C-ECHO answers Success.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt

from common.config import Settings
from common.jobstore import queries
from common.jobstore.db import session_scope
from service.ingest.receiver import Receiver
from service.scp.access import RJ_CONGESTION, RJ_LIMIT, AccessPolicy, Refusal, check_context_ids
from service.scp.contexts import (
    STORAGE_SOP_CLASSES,
    STORAGE_TRANSFER_SYNTAXES,
    UNCOMPRESSED,
    VERIFICATION,
    add_contexts,
)
from service.scp.gate import gate_from_settings
from service.scp.pynetdicom_gate import conn_of, start_gated_server
from service.scp.ul import StoreRequest, UpperLayerServer
from service.status import disk_status

log = logging.getLogger("synthperf.scp")
_STORAGE = frozenset(STORAGE_SOP_CLASSES)


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Server-side TLS from settings (None when no certificate is configured).

    With ``tls_ca`` set, peers must present a certificate signed by it (mutual TLS).
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_ca is not None:
        ctx.load_verify_locations(cafile=str(settings.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ScpServer:
    """The storage SCP: policy hooks shared by both engines; ``start()`` returns once it listens
    (port 0 picks a free port, read it back from ``.port``)."""

    def __init__(
        self,
        settings: Settings,
        receiver: Receiver,
        *,
        host: str | None = None,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        disk_ok: Callable[[], bool] | None = None,
        engine: str | None = None,
        spill_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.settings = settings
        self.engine = engine or settings.scp_engine
        if self.engine not in ("fast", "pynetdicom"):
            raise ValueError(f"engine must be 'fast' or 'pynetdicom', got {self.engine!r}")
        self.receiver = receiver
        self.spill_bytes = spill_bytes  # fast engine: larger data sets wait on disk, not in memory
        self.host = host if host is not None else settings.scp_host
        self.port = port if port is not None else settings.scp_port
        self.ssl_context = ssl_context if ssl_context is not None else make_ssl_context(settings)
        self.policy = AccessPolicy(settings.ae_title, settings.allowed_aets, settings.allowed_networks)
        self.gate = gate_from_settings(settings)  # caps, deadlines, eviction: both engines
        self._disk_ok = disk_ok or (lambda: bool(disk_status(settings)["ok"]))
        self._server: Any = None
        self.started_at: float | None = None
        self.accepted = 0
        self.rejected = 0
        self.recent_refusals: deque[tuple[float, str]] = deque(maxlen=20)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.maximum_pdu_size = s.max_pdu
        ae.require_called_aet = False  # checked in _on_requested, with a logged reason
        ae.implementation_version_name = "SYNTHPERF_01"
        add_contexts(ae)
        return ae

    def start(self) -> int:
        if self.engine == "fast":
            s = self.settings
            self._server = UpperLayerServer(
                self, self.host, self.port, gate=self.gate, ssl_context=self.ssl_context,
                max_pdu=s.max_pdu, network_timeout=s.network_timeout_s,
                spill_dir=self.receiver.spool.root, spill_bytes=self.spill_bytes,
            )
            self._server.start()
            self.port = self._server.port
            self.started_at = time.time()
            log.info("SCP %s listening on %s:%d%s", s.ae_title, self.host, self.port,
                     " (TLS)" if self.ssl_context else "")
            return self.port
        ae = self._make_ae()
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = start_gated_server(ae, (self.host, self.port), self.gate, handlers, self.ssl_context,
                                          self.association_refused)
        self.port = self._server.server_address[1]
        self.started_at = time.time()
        log.info(
            "SCP %s listening on %s:%d%s", self.settings.ae_title, self.host, self.port,
            " (TLS)" if self.ssl_context else "",
        )
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            if self.engine == "fast":
                self._server.stop()
            else:
                self._server.shutdown()
                self.gate.stop()
            self._server = None
            log.info("SCP stopped")

    @property
    def active_associations(self) -> int:
        return self.gate.established_count() if self._server is not None else 0

    def info(self) -> dict[str, Any]:
        """Heartbeat payload: what the system page shows for the SCP."""
        st = self.receiver.stats
        return {
            "ae_title": self.settings.ae_title,
            "port": self.port,
            "tls": self.ssl_context is not None,
            "engine": self.engine,
            "active_associations": self.active_associations,
            "pending_connections": self.gate.pending_count(),
            "hostile_connection_events": dict(self.gate.counts),
            "associations_accepted": self.accepted,
            "associations_rejected": self.rejected,
            "instances_stored": st.stored,
            "duplicates": st.duplicates,
            "conflicts": st.conflicts,
            "store_failures": st.failed,
            "last_stored_at": st.last_stored_at,
        }

    # ------------------------------------------------------------------ policy (both engines)
    def check_association(self, called: str, calling: str, address: str) -> Refusal | None:
        refusal = self.policy.check(called, calling, address)
        if refusal is None and not self._disk_ok():
            d = disk_status(self.settings)
            refusal = Refusal(
                RJ_CONGESTION,
                f"free disk {d['free_mb']:.0f} MB is under the watermark {d['watermark_mb']} MB; "
                "free space or lower SYNTHPERF_DISK_WATERMARK_MB",
            )
        return refusal

    def association_refused(self, refusal: Refusal, calling: str, peer: str) -> None:
        with self._lock:
            self.rejected += 1
            self.recent_refusals.append((time.time(), refusal.reason))
        log.warning("association from %s (%s) rejected: %s", calling, peer, refusal.reason)
        try:
            with session_scope(self.receiver.database_url) as s:
                queries.add_scp_event(s, "rejected", calling[:16] or None, peer, refusal.reason)
        except Exception:  # noqa: BLE001
            log.exception("could not record the rejection")

    def association_accepted(self, calling: str, peer: str) -> None:
        with self._lock:
            self.accepted += 1
        log.info("association accepted from %s (%s)", calling, peer)

    def supported_transfer_syntaxes(self, abstract_syntax: str) -> tuple[str, ...] | None:
        if abstract_syntax == VERIFICATION:
            return UNCOMPRESSED[:3]
        if abstract_syntax in _STORAGE:
            return STORAGE_TRANSFER_SYNTAXES
        return None

    def store(self, request: StoreRequest) -> int:
        return self.receiver.receive(
            request.data, request.transfer_syntax, request.sop_class_uid, request.sop_instance_uid,
            calling_aet=request.calling_aet, peer=request.peer,
        ).status

    # ------------------------------------------------------------------ pynetdicom handlers
    def _refuse(self, event: evt.Event, refusal: Refusal, calling: str) -> None:
        rq = event.assoc.requestor
        self.association_refused(refusal, calling.strip(), f"{rq.address}:{rq.port}")
        event.assoc.acse.send_reject(*refusal.rsd)
        # Wait until the A-ASSOCIATE-RJ is on the wire and the peer has closed (as pynetdicom does
        # for its own rejections); otherwise the socket may be shut before the PDU leaves.
        event.assoc.kill()

    def _on_requested(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        primitive = rq.primitive
        # At EVT_REQUESTED pynetdicom has not copied the AE titles yet: read the A-ASSOCIATE-RQ.
        called = primitive.called_ae_title if primitive is not None else ""
        calling = primitive.calling_ae_title if primitive is not None else ""
        refusal = self.check_association(called, calling, rq.address)
        if refusal is None and primitive is not None:
            refusal = check_context_ids([cx.context_id for cx in primitive.presentation_context_definition_list])
        conn = conn_of(event.assoc)
        if refusal is None and conn is not None and not self.gate.reserve(conn):
            refusal = Refusal(RJ_LIMIT, f"max_associations ({self.settings.max_associations}) reached")
        if refusal is not None:
            self._refuse(event, refusal, calling)

    def _on_accepted(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        self.association_accepted((rq.ae_title or "").strip(), f"{rq.address}:{rq.port}")

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int:
        req = event.request
        rq = event.assoc.requestor
        data = req.DataSet.getvalue() if req.DataSet is not None else b""
        conn = conn_of(event.assoc)
        if conn is not None:
            self.gate.busy(conn, True)  # the peer waits for our answer: not a stall
        try:
            outcome = self.receiver.receive(
                data,
                str(event.context.transfer_syntax),
                str(req.AffectedSOPClassUID),
                str(req.AffectedSOPInstanceUID),
                calling_aet=(rq.ae_title or "").strip(),
                peer=f"{rq.address}:{rq.port}",
            )
        finally:
            if conn is not None:
                self.gate.busy(conn, False)
        return outcome.status
