"""Deliver encoded objects to every configured PACS, exactly once each, surviving PACS outages.

The job store holds one Delivery row per (job, destination, object). A destination is a C-STORE
PACS or a DICOMweb STOW-RS endpoint (:mod:`worker.pipeline.stow`); both answer one outcome per
object. A row is *pending* until its C-STORE (or STOW-RS) returns a success or warning status, then
*sent*; if it has not been sent within
``push_retry_period_s`` (default 24 h) of its first attempt window it becomes *dead*
(dead-lettered) and waits for a person to re-push it (``synthperf repush JOB_ID``).

Why it never sends twice: a worker *claims* a due row by moving its ``next_attempt_at`` forward
in a conditional UPDATE (only one claimant can win), sends, then records the outcome. Why it
never re-encodes: the row stores the path of the file encode wrote, and that file is sent as
stored (pynetdicom streams it from disk when the PACS accepts its transfer syntax; otherwise the
dataset is read and sent in a syntax the PACS accepted, which is a lossless re-wrapping of the
same elements, not a new encoding).

Network code and scheduling stay apart: :func:`send_files` speaks DICOM and knows nothing of the
job store; :func:`push_due` decides what is due and records outcomes.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from common.config import Destination, Settings, StowDestination
from common.jobstore.db import session_scope
from common.jobstore.models import Delivery, DeliveryState, Job, JobState

log = logging.getLogger(__name__)

# C-STORE statuses that mean the PACS has the object (PS3.4 B.2.3): success and the warnings
# "coercion of data elements", "elements discarded", "data set does not match SOP class".
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
CLAIM_LEASE_S = 300.0
# Send a file given by path straight from disk (no decode/re-encode of the stored bytes).
_config.STORE_SEND_CHUNKED_DATASET = True  # a claimed row is not due again for this long, even if the worker dies


def destination_key(dest: Destination | StowDestination) -> str:
    return dest.key


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(dt: datetime) -> datetime:
    """SQLite returns naive datetimes; everything we store is UTC."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff after ``attempts`` failed attempts: initial, 2x, 4x, ... capped."""
    if attempts < 1:
        raise ValueError(f"attempts {attempts} must be >= 1")
    return float(min(max_s, initial_s * (2 ** min(attempts - 1, 30))))


# --------------------------------------------------------------------------- network


@dataclass
class SendOutcome:
    path: str
    status: int | None  # DICOM status, None when no response (association failed)
    error: str | None = None

    @property
    def stored(self) -> bool:
        return self.status in STORED_STATUSES


def tls_context(settings: Settings) -> ssl.SSLContext:
    """Client-side TLS: verify the PACS against tls_ca (or system CAs), present our cert if set."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca) if settings.tls_ca else None)
    if settings.tls_cert and settings.tls_key:
        ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return ctx


def send_files(
    paths: Sequence[str],
    dest: Destination,
    calling_aet: str,
    *,
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 30.0,
) -> list[SendOutcome]:
    """C-STORE each file over one association; one outcome per path, in order.

    Proposes, per SOP class, the file's own transfer syntax first, then explicit and implicit
    VR little endian, so any PACS that accepts uncompressed data can take our objects.
    """
    if not paths:
        return []
    headers = {}
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        headers[p] = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    contexts: dict[str, list[str]] = {}
    for sop_class, ts in headers.values():
        syntaxes = contexts.setdefault(sop_class, [])
        for uid in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if uid not in syntaxes:
                syntaxes.append(uid)
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} SOP classes in one push; at most 128 presentation contexts fit")
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.requested_contexts = [build_context(sop, ts) for sop, ts in contexts.items()]
    kwargs = {}
    if dest.tls:
        kwargs["tls_args"] = (tls or ssl.create_default_context(), dest.host)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, **kwargs)
    except Exception as exc:  # noqa: BLE001 - socket/TLS errors surface as many types
        return [SendOutcome(p, None, f"cannot connect to {destination_key(dest)}: {exc}") for p in paths]
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "no association (PACS unreachable or aborted)"
        return [SendOutcome(p, None, f"{destination_key(dest)}: {why}") for p in paths]
    outcomes: list[SendOutcome] = []
    try:
        accepted = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(cx.abstract_syntax, set()).add(cx.transfer_syntax[0])
        for p in paths:
            if not assoc.is_established:
                outcomes.append(SendOutcome(p, None, f"{destination_key(dest)}: association lost"))
                continue
            sop_class, ts = headers[p]
            if sop_class not in accepted:
                outcomes.append(SendOutcome(p, None, f"{destination_key(dest)} does not accept SOP class {sop_class}"))
                continue
            try:
                if ts in accepted[sop_class]:
                    status = assoc.send_c_store(Path(p))  # streamed from the stored file
                else:
                    status = assoc.send_c_store(dcmread(p))  # same elements in an accepted syntax
            except Exception as exc:  # noqa: BLE001
                outcomes.append(SendOutcome(p, None, f"C-STORE failed: {exc}"))
                continue
            code = int(status.Status) if status is not None and "Status" in status else None
            err = None if code in STORED_STATUSES else (
                f"C-STORE status 0x{code:04X}" if code is not None else "no C-STORE response (timeout or abort)"
            )
            outcomes.append(SendOutcome(p, code, err))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


# --------------------------------------------------------------------------- job store


def register_deliveries(
    session: Session, job_id: int, objects: Iterable[tuple[str, str, str]], destinations: Sequence[Destination]
) -> int:
    """Create pending rows for (sop_instance_uid, sop_class_uid, path) x destination; idempotent.

    Returns how many rows were created. Existing rows (a restarted encode stage) are left alone,
    so an object already sent is not sent again.
    """
    existing = {
        (d.destination, d.sop_instance_uid)
        for d in session.scalars(select(Delivery).where(Delivery.job_id == job_id))
    }
    created = 0
    now = utcnow()
    for dest in destinations:
        key = destination_key(dest)
        for sop_uid, sop_class, path in objects:
            if (key, sop_uid) in existing:
                continue
            session.add(Delivery(
                job_id=job_id, destination=key, sop_instance_uid=sop_uid, sop_class_uid=sop_class,
                path=path, state=DeliveryState.PENDING, attempts=0, created_at=now, next_attempt_at=now,
            ))
            created += 1
    session.flush()
    return created


@dataclass
class PushReport:
    sent: int = 0
    failed_attempts: int = 0
    pending: int = 0
    dead: int = 0
    total: int = 0
    next_attempt_at: datetime | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.pending == 0

    def as_dict(self) -> dict:
        return {
            "sent": self.sent, "failed_attempts": self.failed_attempts, "pending": self.pending,
            "dead": self.dead, "total": self.total,
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
            "errors": self.errors[:20],
        }


def _claim(session: Session, row_id: int, now: datetime) -> bool:
    res = session.execute(
        update(Delivery)
        .where(Delivery.id == row_id, Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
        .values(next_attempt_at=now + timedelta(seconds=CLAIM_LEASE_S))
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def _destinations_by_key(settings: Settings) -> dict[str, Destination | StowDestination]:
    return {destination_key(d): d for d in settings.destinations}


Sender = Callable[..., list[SendOutcome]]


def _stow_send(paths: Sequence[str], dest: StowDestination, calling_aet: str, **kwargs: object) -> list[SendOutcome]:
    from worker.pipeline import stow  # imported when a STOW-RS destination exists (requests, dicomweb-client)

    return stow.send_files(paths, dest, calling_aet, **kwargs)


def push_due(settings: Settings, job_id: int, now: datetime | None = None, sender: Sender = send_files,
             stow_sender: Sender = _stow_send) -> PushReport:
    """Try every due pending delivery of a job once; record outcomes; update the job state.
    ``sender`` speaks C-STORE, ``stow_sender`` STOW-RS (tests replace them).

    Rows whose destination is no longer configured stay pending with an error saying so (they
    are not silently dropped: re-adding the destination or re-pushing resolves them).
    """
    started = utcnow()
    now = now or started
    url = settings.effective_database_url
    dests = _destinations_by_key(settings)
    claimed: dict[str, list[tuple[int, str]]] = {}
    with session_scope(url) as s:
        due = s.scalars(
            select(Delivery).where(
                Delivery.job_id == job_id, Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now
            ).order_by(Delivery.id)
        ).all()
        for row in due:
            if row.destination not in dests:
                row.last_error = f"destination {row.destination} is no longer configured; add it back or re-push"
                row.next_attempt_at = now + timedelta(seconds=settings.push_backoff_max_s)
                continue
            if _claim(s, row.id, now):
                claimed.setdefault(row.destination, []).append((row.id, row.path))
    report = PushReport()
    tls = None
    if any(isinstance(dests[k], Destination) and dests[k].tls for k in claimed):
        tls = tls_context(settings)
    for key, rows in claimed.items():
        existing = [(rid, p) for rid, p in rows if Path(p).is_file()]
        missing = [(rid, p) for rid, p in rows if not Path(p).is_file()]
        send = stow_sender if isinstance(dests[key], StowDestination) else sender
        outcomes = {o.path: o for o in send([p for _, p in existing], dests[key], settings.push_calling_aet, tls=tls)}
        finished = now + (utcnow() - started)  # the caller's clock, advanced by the time spent
        with session_scope(url) as s:
            for rid, p in existing + missing:
                row = s.get(Delivery, rid)
                if row is None or row.state != DeliveryState.PENDING:
                    continue
                row.attempts += 1
                out = outcomes.get(p) or SendOutcome(p, None, f"encoded file {p} is missing; re-run encode")
                row.last_status = out.status
                if out.stored:
                    row.state = DeliveryState.SENT
                    row.delivered_at = finished
                    row.last_error = None
                    report.sent += 1
                    continue
                report.failed_attempts += 1
                row.last_error = out.error
                if out.error and out.error not in report.errors:
                    report.errors.append(out.error)
                if finished - _aware(row.created_at) >= timedelta(seconds=settings.push_retry_period_s):
                    row.state = DeliveryState.DEAD
                    log.warning("delivery dead-lettered", extra={"job_id": job_id, "destination": key})
                else:
                    wait = backoff_s(row.attempts, settings.push_backoff_initial_s, settings.push_backoff_max_s)
                    row.next_attempt_at = finished + timedelta(seconds=wait)
    with session_scope(url) as s:
        _summarise(s, job_id, report)
    return report


def _summarise(s: Session, job_id: int, report: PushReport) -> None:
    rows = s.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
    report.total = len(rows)
    report.pending = sum(r.state == DeliveryState.PENDING for r in rows)
    report.dead = sum(r.state == DeliveryState.DEAD for r in rows)
    pending_times = [_aware(r.next_attempt_at) for r in rows if r.state == DeliveryState.PENDING]
    report.next_attempt_at = min(pending_times) if pending_times else None
    job = s.get(Job, job_id)
    if job is None or job.state in (JobState.CANCELLED, JobState.SUPERSEDED, JobState.FAILED,
                                    JobState.INPUT_MISSING):
        return
    if report.pending:
        job.state = JobState.DELIVERING
    elif report.dead:
        dead_to = sorted({r.destination for r in rows if r.state == DeliveryState.DEAD})
        job.state = JobState.FAILED
        job.error = (
            f"{report.dead} object(s) could not be delivered to {', '.join(dead_to)} within the retry period; "
            f"check the PACS, then run: synthperf repush {job_id}"
        )
        job.finished_at = utcnow()
    else:
        job.state = JobState.DONE
        job.error = None
        job.finished_at = utcnow()
        job.progress = 1.0


def repush(settings: Settings, job_id: int, include_sent: bool = False, now: datetime | None = None) -> int:
    """Make dead (and, if asked, sent) deliveries of a job pending again, due now, with a fresh
    retry period; returns how many rows were reset. The files are the stored ones, not re-encoded.
    """
    now = now or utcnow()
    states = [DeliveryState.DEAD, DeliveryState.PENDING] + ([DeliveryState.SENT] if include_sent else [])
    with session_scope(settings.effective_database_url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist; list jobs with: synthperf jobs")
        rows = s.scalars(select(Delivery).where(Delivery.job_id == job_id, Delivery.state.in_(states))).all()
        for row in rows:
            row.state = DeliveryState.PENDING
            row.next_attempt_at = now
            row.created_at = now  # the retry period starts again
            row.last_error = None
        if rows and job.state in (JobState.FAILED, JobState.DONE):
            job.state = JobState.DELIVERING
            job.error = None
            job.finished_at = None
        return len(rows)
