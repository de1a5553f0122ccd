"""Schema set-up and the queries the gateway (SCP, completion) and the job views need.

``init_db(url)`` brings any database to the newest schema by running ``alembic upgrade head``
from the migrations packaged next to this module, so no alembic.ini is needed at run time.
Every process may call it at start-up: concurrent callers are serialised (a lock file next to
a SQLite database, an advisory lock on PostgreSQL), and an up-to-date database is a no-op.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import bindparam, exists, func, insert, select, text, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from common.jobstore.db import get_engine
from common.jobstore.models import Base, Heartbeat, Instance, Job, JobState, ScpEvent, Series, Study, utcnow

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x5379_6E74  # "Synt": advisory-lock key for concurrent migrations


def alembic_config(url: str) -> Config:
    """An in-memory Alembic config pointing at the packaged migrations (no alembic.ini)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["url"] = url
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        db_path = Path(url[len("sqlite:///"):])
        db_path.parent.mkdir(parents=True, exist_ok=True)
        with open(db_path.with_name(db_path.name + ".migrate.lock"), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if url.startswith("postgresql"):
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
        return
    yield


def init_db(url: str) -> str | None:
    """Create or upgrade the job store at ``url`` to the newest schema; return the revision.

    Safe to call from every process at start-up (serialised, idempotent).
    """
    with _migration_lock(url):
        if current_revision(url) != head_revision():
            command.upgrade(alembic_config(url), "head")
    return current_revision(url)


# --------------------------------------------------------------------------- gateway writes
# The SCP calls these once per instance, so each is one or two statements, no ORM loading.


def storable(model: type[Base], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for columns of ``model`` as every database stores them alike: None values dropped,
    NUL characters removed from strings and strings clipped to their column's length.

    PostgreSQL refuses text longer than a VARCHAR column and any NUL character, where SQLite keeps
    whatever it is given; a sender's over-long or NUL-padded description must neither fail a store
    on one database only nor read back differently on the other.
    """
    columns = model.__table__.c
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str):
            value = value.replace("\x00", "")
            length = getattr(columns[key].type, "length", None)
            if length is not None and len(value) > length:
                value = value[:length]
            value = value or None
        if value is not None:
            out[key] = value
    return out


def get_or_create_study(session: Session, study_uid: str, **attrs: Any) -> int:
    """Id of the study row for ``study_uid``, inserting it (with ``attrs``) when new.

    Safe against a concurrent writer inserting the same UID (savepoint, then read back).
    """
    row = session.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar()
    if row is not None:
        return row
    try:
        with session.begin_nested():
            study = Study(study_uid=study_uid, **storable(Study, attrs))
            session.add(study)
        return study.id
    except IntegrityError:
        return session.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one()


def get_or_create_series(session: Session, study_id: int, series_uid: str, **attrs: Any) -> int:
    """Id of the series row for ``series_uid`` (inserted when new; concurrency-safe like studies)."""
    row = session.execute(select(Series.id).where(Series.series_uid == series_uid)).scalar()
    if row is not None:
        return row
    try:
        with session.begin_nested():
            series = Series(study_id=study_id, series_uid=series_uid, **storable(Series, attrs))
            session.add(series)
        return series.id
    except IntegrityError:
        return session.execute(select(Series.id).where(Series.series_uid == series_uid)).scalar_one()


def find_instance(session: Session, sop_instance_uid: str) -> tuple[int, str, str] | None:
    """(id, sha256, path) of a stored instance, or None."""
    row = session.execute(
        select(Instance.id, Instance.sha256, Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()
    return None if row is None else (row[0], row[1], row[2])


def series_counts(session: Session, series_id: int) -> tuple[int | None, int]:
    """(declared images or None, images received: frames of multi-frame objects count singly)."""
    expected = session.execute(select(Series.expected_instances).where(Series.id == series_id)).scalar()
    received = session.execute(
        select(func.sum(func.coalesce(Instance.number_of_frames, 1))).where(Instance.series_id == series_id)
    ).scalar()
    return expected, int(received or 0)


class DuplicateInstanceError(Exception):
    """An instance row with this SOP Instance UID exists already."""


_SQLITE_INSERT = (
    "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, instance_number, "
    "number_of_frames, path, size_bytes, sha256, calling_aet, received_at) "
    "VALUES (:series_id, :sop_instance_uid, :sop_class_uid, :transfer_syntax_uid, :instance_number, "
    ":number_of_frames, :path, :size_bytes, :sha256, :calling_aet, :received_at)"
)


class InstanceWriter:
    """The per-instance statements of the C-STORE hot path: one short transaction per instance.

    On SQLite (the embedded default) it uses one plain sqlite3 connection per thread with the
    same pragmas as the engine: SQLAlchemy's per-statement overhead was most of the receive cost.
    Elsewhere (PostgreSQL) it runs pre-built Core statements. Timestamps are stored the way
    SQLAlchemy stores them (naive UTC text on SQLite), so ORM readers see the same values.
    """

    def __init__(self, url: str) -> None:
        self.engine = get_engine(url)
        self._sqlite_path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
        self._local = threading.local()
        self._find = select(Instance.id, Instance.sha256, Instance.path).where(
            Instance.sop_instance_uid == bindparam("sop")
        )
        self._insert = insert(Instance)
        self._touch_series = (
            update(Series).where(Series.id == bindparam("sid")).values(last_received_at=bindparam("now"))
        )
        self._touch_study = (
            update(Study).where(Study.id == bindparam("stid")).values(last_received_at=bindparam("now"))
        )

    def _raw(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._sqlite_path, timeout=30, isolation_level=None)  # type: ignore[arg-type]
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
                conn.execute(f"PRAGMA {pragma}")
            self._local.conn = conn
        return conn

    def find(self, sop_instance_uid: str) -> tuple[int, str, str] | None:
        """(id, sha256, path) of a stored instance, or None."""
        if self._sqlite_path:
            row = self._raw().execute(
                "SELECT id, sha256, path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        else:
            with self.engine.connect() as conn:
                row = conn.execute(self._find, {"sop": sop_instance_uid}).first()
        return None if row is None else (row[0], row[1], row[2])

    def add(self, values: dict[str, Any], study_id: int, touch: bool) -> None:
        """Insert the instance (raising DuplicateInstanceError if its UID is known); with
        ``touch`` also move series/study last_received_at. One transaction."""
        now: datetime = values["received_at"]
        if self._sqlite_path:
            conn = self._raw()
            stamp = now.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
            row = dict(values, received_at=stamp)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(_SQLITE_INSERT, row)
                if touch:
                    conn.execute("UPDATE series SET last_received_at = ? WHERE id = ?", (stamp, values["series_id"]))
                    conn.execute("UPDATE studies SET last_received_at = ? WHERE id = ?", (stamp, study_id))
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                conn.execute("ROLLBACK")
                raise DuplicateInstanceError(values["sop_instance_uid"]) from exc
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(self._insert, values)
                if touch:
                    conn.execute(self._touch_series, {"sid": values["series_id"], "now": now})
                    conn.execute(self._touch_study, {"stid": study_id, "now": now})
        except IntegrityError as exc:
            raise DuplicateInstanceError(values["sop_instance_uid"]) from exc


def raise_expected(session: Session, series_id: int, expected: int) -> None:
    """Record a declared series size; the largest declaration seen wins."""
    session.execute(
        update(Series)
        .where(Series.id == series_id)
        .where((Series.expected_instances.is_(None)) | (Series.expected_instances < expected))
        .values(expected_instances=expected)
    )


def add_scp_event(session: Session, kind: str, calling_aet: str | None, peer: str | None, reason: str) -> None:
    values = {"kind": kind, "calling_aet": calling_aet, "peer": peer, "reason": reason}
    session.add(ScpEvent(**storable(ScpEvent, values)))


def recent_scp_events(session: Session, limit: int = 50, kind: str | None = None) -> list[ScpEvent]:
    q = select(ScpEvent).order_by(ScpEvent.id.desc()).limit(limit)
    if kind:
        q = q.where(ScpEvent.kind == kind)
    return list(session.execute(q).scalars())


def upsert_heartbeat(session: Session, component: str, instance: str, info: dict[str, Any]) -> None:
    row = session.execute(select(Heartbeat).where(Heartbeat.instance == instance)).scalar()
    if row is None:
        session.add(Heartbeat(component=component, instance=instance, info=info, at=utcnow()))
    else:
        row.component, row.info, row.at = component, info, utcnow()


def heartbeats(session: Session) -> list[Heartbeat]:
    return list(session.execute(select(Heartbeat).order_by(Heartbeat.component, Heartbeat.instance)).scalars())


# --------------------------------------------------------------------------- completion


@dataclass
class StudyProgress:
    """What the completion rules need to know about one study with uncovered instances."""

    study_id: int
    study_uid: str
    instance_count: int  # instances stored for the study
    covered_count: int  # instances the latest job covered (0 without a job)
    latest_job_id: int | None
    first_pending_at: datetime  # receive time of the first instance no job covers yet
    last_received_at: datetime
    series: list[tuple[int, int | None, int]]  # (series id, expected images or None, images received)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def claim_study(session: Session, study_id: int) -> bool:
    """Lock the study's row for this transaction, or False at once if another transaction holds it.

    ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL: of several gateway replicas' completion
    loops that find one study due, one gets the row and makes the job; the others skip it without
    waiting (issue 19). The lock lasts until the transaction ends, so a replica that dies while
    holding it loses it with its connection. SQLite has no row locks (SQLAlchemy leaves the clause
    out) and serves one gateway only (``common.jobstore.replicas``), so there it is always True.
    """
    got = session.execute(
        select(Study.id).where(Study.id == study_id).with_for_update(skip_locked=True)
    ).scalar()
    return got is not None


def studies_with_pending_instances(session: Session, study_id: int | None = None) -> list[StudyProgress]:
    """Studies holding instances that no job covers yet (new study or late arrivals); only
    ``study_id`` when given (the re-check under :func:`claim_study`)."""
    counts = (
        select(Series.study_id.label("study_id"), func.count(Instance.id).label("n"))
        .join(Instance, Instance.series_id == Series.id)
        .group_by(Series.study_id)
        .subquery()
    )
    latest = (
        select(Job.study_id.label("study_id"), func.max(Job.version).label("v")).group_by(Job.study_id).subquery()
    )
    rows = session.execute(
        select(Study.id, Study.study_uid, counts.c.n, Job.instance_count, Job.id, Job.created_at)
        .join(counts, counts.c.study_id == Study.id)
        .outerjoin(latest, latest.c.study_id == Study.id)
        .outerjoin(Job, (Job.study_id == Study.id) & (Job.version == latest.c.v))
        .where(counts.c.n > func.coalesce(Job.instance_count, 0))
        .where(Study.id == study_id if study_id is not None else true())
    ).all()
    out: list[StudyProgress] = []
    for study_id, study_uid, n, covered, job_id, job_created in rows:
        received = session.execute(
            select(func.min(Instance.received_at), func.max(Instance.received_at))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study_id)
            .where(Instance.received_at > job_created if job_created is not None else true())
        ).one()
        last_any = session.execute(
            select(func.max(Instance.received_at))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study_id)
        ).scalar()
        series_rows = session.execute(
            select(Series.id, Series.expected_instances, func.sum(func.coalesce(Instance.number_of_frames, 1)))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
            .group_by(Series.id, Series.expected_instances)
        ).all()
        first_pending = received[0] or last_any
        out.append(
            StudyProgress(
                study_id=study_id,
                study_uid=study_uid,
                instance_count=int(n),
                covered_count=int(covered or 0),
                latest_job_id=job_id,
                first_pending_at=_aware(first_pending),
                last_received_at=_aware(last_any),
                series=[(sid, exp, int(got or 0)) for sid, exp, got in series_rows],
            )
        )
    return out


def create_job(session: Session, study_id: int, trigger: str, instance_count: int) -> Job:
    """A new job covering ``instance_count`` instances; it supersedes the study's earlier jobs.

    A queued or running job is marked SUPERSEDED and asked to cancel; a finished one (done,
    failed, input_missing, cancelled) is marked SUPERSEDED too, so that a job that failed on part
    of a study never stands beside the job that covers all of it. A job still delivering keeps
    delivering what it made and is marked once it finishes (``supersede_finished``).
    """
    previous = session.execute(
        select(Job).where(Job.study_id == study_id).order_by(Job.version.desc()).limit(1)
    ).scalar()
    job = Job(
        study_id=study_id,
        version=(previous.version + 1) if previous else 1,
        state=JobState.QUEUED,
        trigger=trigger,
        instance_count=instance_count,
        supersedes_job_id=previous.id if previous else None,
        warnings=[],
    )
    if previous is not None and previous.state in (JobState.QUEUED, JobState.RUNNING):
        previous.state = JobState.SUPERSEDED
        previous.cancel_requested = True
        previous.finished_at = utcnow()
    session.add(job)
    session.flush()
    supersede_finished(session, study_id)
    return job


COMPLETION_TRIGGERS = ("expected_count", "stable_age", "incomplete", "ceiling")


def claim_unsent_jobs(session: Session, limit: int = 100) -> list[int]:
    """Ids of queued jobs the completion made and no loop has handed to the broker yet, locked for
    this transaction (``FOR UPDATE SKIP LOCKED``: two replicas never send the same job at once).

    The caller sends each and sets ``enqueued_at`` before committing; a send that fails leaves the
    job for the next pass (of any replica), and a gateway that dies between creating a job and
    sending it leaves it here instead of in its lost memory.
    """
    return list(session.execute(
        select(Job.id)
        .where(Job.enqueued_at.is_(None), Job.state == JobState.QUEUED, Job.trigger.in_(COMPLETION_TRIGGERS))
        .order_by(Job.id).limit(limit).with_for_update(skip_locked=True)
    ).scalars())


def mark_enqueued(session: Session, job_id: int, at: datetime | None = None) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=at or utcnow())
                    .execution_options(synchronize_session=False))


SUPERSEDABLE_FINISHED = (JobState.DONE, JobState.FAILED, JobState.INPUT_MISSING, JobState.CANCELLED)


def supersede_finished(session: Session, study_id: int | None = None) -> list[int]:
    """Mark SUPERSEDED every finished job that a newer job of its study replaced; return their ids.

    ``create_job`` calls it for its study; the completion loop calls it for all studies on each
    pass, which catches the jobs that finished after their successor was created: a worker that
    records a stage failure (``input_missing``) after the follow-up job marked its job
    superseded, or a superseded job that was still delivering. A superseded job keeps its error
    text, so the job page still says what happened to it.
    """
    newer = aliased(Job)
    q = select(Job.id).where(Job.state.in_(SUPERSEDABLE_FINISHED)).where(
        exists().where(newer.study_id == Job.study_id, newer.version > Job.version)
    )
    if study_id is not None:
        q = q.where(Job.study_id == study_id)
    ids = list(session.execute(q).scalars())
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.state.in_(SUPERSEDABLE_FINISHED))
            .values(state=JobState.SUPERSEDED, finished_at=func.coalesce(Job.finished_at, utcnow()))
            .execution_options(synchronize_session=False)
        )
        for obj in list(session.identity_map.values()):  # loaded copies must not keep the old state
            if isinstance(obj, Job) and obj.id in ids:
                session.expire(obj)
    return ids


def job_instances(session: Session, job: Job) -> list[Instance]:
    """The instances a job covers: its study's first ``instance_count`` instances by arrival."""
    return list(
        session.execute(
            select(Instance)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == job.study_id)
            .order_by(Instance.id)
            .limit(job.instance_count)
        ).scalars()
    )


def list_jobs(session: Session, limit: int = 100) -> list[tuple[Job, Study]]:
    rows = session.execute(
        select(Job, Study).join(Study, Study.id == Job.study_id).order_by(Job.id.desc()).limit(limit)
    ).all()
    return [(j, s) for j, s in rows]
