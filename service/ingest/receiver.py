"""One received instance, from raw bytes to a spooled file and a job-store row.

This is the C-STORE hot path without the network: the SCP hands over the data set bytes as
received, the negotiated transfer syntax and the command's SOP Class/Instance UIDs, and gets a
DICOM status back. The order is what makes it safe: validate -> write (temp + fsync + link) ->
record -> Success. Nothing is decoded; per instance the job store sees one lookup and one short
transaction (study and series ids are cached).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from common.jobstore import queries
from common.jobstore.db import session_factory
from common.jobstore.models import utcnow
from service.ingest.dataset import IS_MAX, Header, MalformedDatasetError, parse_dataset, split_part10
from service.ingest.spool import Spool, sha256_of
from service.ingest.uids import InvalidUIDError, check_uid

log = logging.getLogger("synthperf.ingest")

# C-STORE response statuses (PS3.4 B.2.3 and PS3.7 C); the conformance statement lists them.
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # data set does not match the SOP Class / Instance of the request
CANNOT_UNDERSTAND = 0xC000  # not a complete DICOM data set (non-DICOM payload, truncated)
MISSING_UID = 0xC001  # Study, Series or SOP Instance UID absent
INVALID_UID = 0xC002  # a UID that is not digits and dots (and so can never become a path)

# A final spool file with no row younger than this may be another gateway's store in flight (shared
# spool, issue 19): wait up to ROW_WAIT_S for its row before treating it as a crash leftover.
YOUNG_FILE_S = 10.0
ROW_WAIT_S = 2.0
TOUCH_INTERVAL_S = 0.5  # study/series last_received_at move at most this often (completion reads instances)

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1460.1"
IMPLEMENTATION_VERSION = "SYNTHPERF_01"


@dataclass
class Outcome:
    status: int
    reason: str = ""
    duplicate: bool = False
    conflict: bool = False
    relpath: str | None = None


@dataclass
class ReceiverStats:
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    failed: int = 0
    last_stored_at: float | None = None
    by_status: dict[int, int] = field(default_factory=dict)


def declared_images(h: Header) -> int | None:
    """How many images (frames) the series declares it will hold, if its header says so.

    Enhanced/multi-frame: NumberOfFrames x NumberOfTemporalPositions (when > 1). Classic:
    ImagesInAcquisition x NumberOfTemporalPositions (when > 1). A declaration speaks for its
    own series only: the study still waits for stable_age of quiet (completion.py). One that is
    too large delays the study to incomplete_series_wait_s of quiet; one that is too small only
    lets the study fire after stable_age as if nothing were declared; nothing is lost either way.
    """
    ntp = h.number_of_temporal_positions if (h.number_of_temporal_positions or 0) > 1 else 1
    if h.number_of_frames and h.number_of_frames > 0:
        return min(h.number_of_frames * ntp, IS_MAX)  # the product must fit an INTEGER column too
    if h.images_in_acquisition and h.images_in_acquisition > 0:
        return min(h.images_in_acquisition * ntp, IS_MAX)
    return None


def _ui(tag: bytes, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return tag + b"UI" + len(raw).to_bytes(2, "little") + raw


def _text(tag: bytes, vr: bytes, value: str) -> bytes:
    raw = value.encode("ascii", errors="replace")
    if len(raw) % 2:
        raw += b" "
    return tag + vr + len(raw).to_bytes(2, "little") + raw


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str | None) -> bytes:
    """Preamble, prefix and File Meta Information group, encoded by hand (hot path)."""
    body = (
        b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"
        + _ui(b"\x02\x00\x02\x00", sop_class)
        + _ui(b"\x02\x00\x03\x00", sop_instance)
        + _ui(b"\x02\x00\x10\x00", transfer_syntax)
        + _ui(b"\x02\x00\x12\x00", IMPLEMENTATION_CLASS_UID)
        + _text(b"\x02\x00\x13\x00", b"SH", IMPLEMENTATION_VERSION)
    )
    if source_aet:
        body += _text(b"\x02\x00\x16\x00", b"AE", source_aet.strip()[:16])
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little")
    return b"\x00" * 128 + b"DICM" + group_length + body


class Receiver:
    """Validates, spools and records received instances. Thread-safe (one per SCP)."""

    def __init__(
        self,
        database_url: str,
        spool: Spool,
        storage_sop_classes: frozenset[str] | None = None,
        on_series_complete: Callable[[], None] | None = None,
    ) -> None:
        if not database_url:
            raise ValueError("database_url must be a SQLAlchemy URL")
        self.database_url = database_url
        self.spool = spool
        self.storage_sop_classes = storage_sop_classes
        self.on_series_complete = on_series_complete
        self._sessions = session_factory(database_url)
        self._writer = queries.InstanceWriter(database_url)
        self._study_ids: dict[str, int] = {}
        self._series: dict[str, list[Any]] = {}  # uid -> [id, expected, images received, study id]
        self._cache_lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._uid_locks = [threading.Lock() for _ in range(64)]
        self.stats = ReceiverStats()
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------ public
    def receive(
        self,
        data: bytes,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_aet: str | None = None,
        peer: str | None = None,
    ) -> Outcome:
        """Store one data set (bytes without file meta); return the DICOM status to answer."""
        try:
            outcome = self._receive(data, transfer_syntax, sop_class_uid, sop_instance_uid, calling_aet)
        except (OSError, OperationalError, sqlite3.Error) as exc:
            outcome = Outcome(OUT_OF_RESOURCES, f"could not store: {exc}")
        except Exception as exc:  # noqa: BLE001 - the association must survive any one bad instance
            log.exception("unexpected error storing %s", sop_instance_uid)
            outcome = Outcome(OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}: {exc}")
        self._account(outcome, sop_instance_uid, calling_aet, peer)
        return outcome

    def receive_file_bytes(self, blob: bytes, calling_aet: str | None = None) -> Outcome:
        """Ingest a Part 10 file's bytes (recovery and tests): split the meta and receive."""
        ts, offset, _meta = split_part10(blob)
        header = parse_dataset(blob[offset:], ts)
        return self.receive(
            blob[offset:], ts, header.sop_class_uid or "", header.sop_instance_uid or "", calling_aet
        )

    # ------------------------------------------------------------------ steps
    def _receive(
        self, data: bytes, ts: str, rq_class: str, rq_instance: str, calling_aet: str | None
    ) -> Outcome:
        if self.storage_sop_classes is not None and rq_class not in self.storage_sop_classes:
            return Outcome(SOP_CLASS_NOT_SUPPORTED, f"SOP Class {rq_class} is not a supported storage class")
        try:
            h = parse_dataset(data, ts)
        except MalformedDatasetError as exc:
            return Outcome(CANNOT_UNDERSTAND, f"not a complete DICOM data set: {exc}")
        try:
            study_uid = check_uid("StudyInstanceUID", h.study_instance_uid)
            series_uid = check_uid("SeriesInstanceUID", h.series_instance_uid)
            sop_uid = check_uid("SOPInstanceUID", h.sop_instance_uid)
            check_uid("SOPClassUID", h.sop_class_uid)
        except InvalidUIDError as exc:
            missing = "missing" in str(exc)
            return Outcome(MISSING_UID if missing else INVALID_UID, str(exc))
        if h.sop_class_uid != rq_class:
            return Outcome(DATASET_MISMATCH, f"data set SOP Class {h.sop_class_uid} differs from the request's {rq_class}")
        if sop_uid != rq_instance:
            return Outcome(DATASET_MISMATCH, f"data set SOP Instance {sop_uid} differs from the request's {rq_instance}")

        relpath = self.spool.relpath(study_uid, series_uid, sop_uid)
        sha = sha256_of((data,))
        chunks = (file_meta(rq_class, sop_uid, ts, calling_aet), data)
        with self._uid_locks[hash(sop_uid) % len(self._uid_locks)]:
            # The common case costs no lookup: link() refuses an existing name, the unique
            # index refuses a known UID; only then do we look at what is stored.
            stored = self.spool.store(relpath, chunks)
            if not stored.created:
                existing = self._writer.find(sop_uid) or self._await_row(sop_uid, stored.path)
                if existing is not None:
                    return self._duplicate(existing, sha, sop_uid, relpath)
                # A final file without a row: left by a run that died before recording it.
                # It was never acknowledged, so this copy wins.
                stored = self.spool.replace(relpath, chunks)
            try:
                self._record(h, relpath, stored.size, sha, ts, calling_aet)
            except queries.DuplicateInstanceError:
                # Recorded meanwhile: under another Study/Series path (our file is an orphan), or by
                # another gateway sharing this spool, whose row names the very file we linked or
                # replaced: that file is the recorded copy and must stay.
                existing = self._writer.find(sop_uid)
                if existing is None:
                    raise
                if existing[2] != relpath:
                    stored.path.unlink(missing_ok=True)
                return self._duplicate(existing, sha, sop_uid, relpath)
        return Outcome(SUCCESS, relpath=relpath)

    def _await_row(self, sop_uid: str, path: Path) -> tuple[int, str, str] | None:
        """The row of a file that has no row yet, if one appears within ``ROW_WAIT_S``.

        A young final file without a row is, in a spool shared by several gateways, another
        gateway's store between its link and its row; an old one is a crash leftover (the start-up
        recovery records those), which this copy replaces at once.
        """
        try:
            young = time.time() - path.stat().st_mtime < YOUNG_FILE_S
        except FileNotFoundError:
            return None
        deadline = time.monotonic() + ROW_WAIT_S
        while young and time.monotonic() < deadline:
            time.sleep(0.05)
            existing = self._writer.find(sop_uid)
            if existing is not None:
                return existing
        return None

    def _duplicate(self, existing: tuple[int, str, str], sha: str, sop_uid: str, relpath: str) -> Outcome:
        _id, old_sha, old_path = existing
        if old_sha == sha:
            return Outcome(SUCCESS, "duplicate, identical", duplicate=True, relpath=old_path)
        return Outcome(
            SUCCESS,
            f"duplicate SOP Instance {sop_uid} with a different payload (sha256 {sha[:12]} vs stored "
            f"{old_sha[:12]}); kept the first copy at {old_path}",
            duplicate=True,
            conflict=True,
            relpath=old_path,
        )

    def _record(self, h: Header, relpath: str, size: int, sha: str, ts: str, calling_aet: str | None) -> None:
        declared = declared_images(h)
        frames = h.number_of_frames if (h.number_of_frames or 0) > 0 else 1
        entry = self._series_entry(h, calling_aet, declared)
        now = time.monotonic()
        touch = now - entry[4] > TOUCH_INTERVAL_S
        values = {
            "series_id": entry[0],
            "sop_instance_uid": h.sop_instance_uid,
            "sop_class_uid": h.sop_class_uid,
            "transfer_syntax_uid": ts,
            "instance_number": h.instance_number,
            "number_of_frames": h.number_of_frames,
            "path": relpath,
            "size_bytes": size,
            "sha256": sha,
            "calling_aet": (calling_aet or "").strip()[:16] or None,
            "received_at": utcnow(),
        }
        self._writer.add(values, entry[3], touch)
        with self._cache_lock:
            if touch:
                entry[4] = now
            entry[2] += frames
            complete = entry[1] is not None and entry[2] >= entry[1]
        if complete and self.on_series_complete is not None:
            self.on_series_complete()

    def _series_entry(self, h: Header, calling_aet: str | None, declared: int | None) -> list[Any]:
        """Cached [series id, expected images, images received, study id, last touch], creating
        the study and series rows on first sight (one extra transaction per new series)."""
        assert h.study_instance_uid and h.series_instance_uid
        entry = self._series.get(h.series_instance_uid)
        if entry is not None and (declared is None or (entry[1] is not None and entry[1] >= declared)):
            return entry
        with self._create_lock:  # parallel associations often start the same series together
            return self._series_entry_locked(h, calling_aet, declared)

    def _series_entry_locked(self, h: Header, calling_aet: str | None, declared: int | None) -> list[Any]:
        assert h.study_instance_uid and h.series_instance_uid
        entry = self._series.get(h.series_instance_uid)
        if entry is not None and (declared is None or (entry[1] is not None and entry[1] >= declared)):
            return entry
        with self._sessions() as session, session.begin():
            if entry is None:
                study_id = self._study_ids.get(h.study_instance_uid)
                if study_id is None:
                    study_id = queries.get_or_create_study(
                        session,
                        h.study_instance_uid,
                        patient_id=h.patient_id,
                        patient_name=h.patient_name,
                        accession_number=h.accession_number,
                        study_date=h.study_date,
                        study_description=h.study_description,
                        calling_aet=(calling_aet or "").strip()[:16] or None,
                    )
                series_id = queries.get_or_create_series(
                    session,
                    study_id,
                    h.series_instance_uid,
                    modality=h.modality,
                    series_number=h.series_number,
                    series_description=h.series_description,
                    expected_instances=declared,
                )
                if declared:
                    queries.raise_expected(session, series_id, declared)
                expected, received = queries.series_counts(session, series_id)
                entry = [series_id, expected, received, study_id, 0.0]
            else:
                queries.raise_expected(session, entry[0], declared)  # type: ignore[arg-type]
                entry[1] = max(entry[1] or 0, declared or 0)
        with self._cache_lock:
            self._study_ids[h.study_instance_uid] = entry[3]
            self._series[h.series_instance_uid] = entry
        return entry

    def forget_caches(self) -> None:
        """Drop cached ids (after rows were deleted behind our back, e.g. retention)."""
        with self._cache_lock:
            self._study_ids.clear()
            self._series.clear()

    # ------------------------------------------------------------------ accounting
    def _account(self, o: Outcome, sop_uid: str, calling_aet: str | None, peer: str | None) -> None:
        with self._stats_lock:
            self.stats.by_status[o.status] = self.stats.by_status.get(o.status, 0) + 1
            if o.status == SUCCESS and not o.duplicate:
                self.stats.stored += 1
                self.stats.last_stored_at = time.time()
            elif o.duplicate:
                self.stats.duplicates += 1
                self.stats.conflicts += int(o.conflict)
            else:
                self.stats.failed += 1
        if o.status != SUCCESS or o.conflict:
            kind = "conflict" if o.conflict else "store_failed"
            level = logging.WARNING
            log.log(
                level,
                "C-STORE %s: status 0x%04X from %s (%s): %s",
                kind,
                o.status,
                calling_aet,
                peer,
                o.reason,
                extra={"sop_instance_uid": sop_uid, "status": o.status, "kind": kind},
            )
            try:
                with self._sessions() as session, session.begin():
                    queries.add_scp_event(
                        session, kind, (calling_aet or "").strip()[:16] or None, peer, f"0x{o.status:04X} {o.reason}"
                    )
            except Exception:  # noqa: BLE001 - an audit row must never break the association
                log.exception("could not record the SCP event")
        elif o.duplicate:
            log.debug("duplicate SOP Instance %s ignored (identical payload)", sop_uid)
