"""SQLAlchemy 2 tables of the job store: the single source of truth for status.

Studies hold series, series hold instances (one row per SOPInstanceUID, written only after the
bytes are on disk under their final name). A job is one run of the pipeline over a study as it
stood when completion fired; a later job supersedes it. Stages record each pipeline step;
deliveries record each output object's way to each destination.

Schema changes go through Alembic (common/jobstore/migrations); never ``create_all`` in production.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class JobState:
    """Job states, in the order a healthy job passes through them."""

    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"  # outputs written, push in progress or waiting for PACS
    DONE = "done"  # every object delivered (or no destination configured)
    FAILED = "failed"  # a stage failed; error says why
    INPUT_MISSING = "input_missing"  # a required series did not arrive; error says which
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"  # a follow-up job for the same study replaced it
    POISONED = "poisoned"  # workers died in the same stage max_stage_attempts times; not retried again

    ACTIVE = (QUEUED, RUNNING, DELIVERING)
    FINAL = (DONE, FAILED, INPUT_MISSING, CANCELLED, SUPERSEDED, POISONED)


class StageState:
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class DeliveryState:
    PENDING = "pending"  # not yet tried, or waiting for its next attempt
    SENT = "sent"
    DEAD = "dead"  # retry period over; dead-lettered, re-push on demand


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(200))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(200))
    calling_aet: Mapped[str | None] = mapped_column(String(16), index=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", cascade="all, delete-orphan")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(200))
    expected_instances: Mapped[int | None] = mapped_column(Integer)  # from headers, when declared
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the spool root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "version", name="uq_job_study_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)  # 1, 2, ... per study; feeds output UIDs
    state: Mapped[str] = mapped_column(String(32), default=JobState.QUEUED, index=True)
    trigger: Mapped[str] = mapped_column(String(32))  # expected_count | stable_age | ceiling | manual
    instance_count: Mapped[int] = mapped_column(Integer, default=0)  # instances the job covers
    supersedes_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    current_stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1 within the whole pipeline
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)  # words a user can act on
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # measures, chosen series, versions
    output_dir: Mapped[str | None] = mapped_column(Text)
    # The lease of the worker process running this job's stages (common/jobstore/leases.py):
    # "host:pid" and until when; renewed every few seconds, cleared when the job is handed on.
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # When a completion loop handed the job to the broker; NULL = made but not sent yet (any gateway
    # replica's next pass sends it: the job store is the outbox, issue 19).
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    study: Mapped[Study] = relationship(back_populates="jobs")
    stages: Mapped[list[Stage]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Stage.id"
    )
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Delivery.id"
    )


class Stage(Base):
    __tablename__ = "stages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))  # classify, load, core, synthesize, measure, encode, push
    state: Mapped[str] = mapped_column(String(16), default=StageState.RUNNING)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # evidence, metrics, artefact paths
    worker: Mapped[str | None] = mapped_column(String(200))  # hostname/pid and device

    job: Mapped[Job] = relationship(back_populates="stages")


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid", name="uq_delivery"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(200))  # "AET@host:port"
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # the encoded file, sent as is on every retry
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)  # DICOM status of the last C-STORE
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="deliveries")


class ScpEvent(Base):
    """Associations accepted and rejected, for the system page and the audit of who sent what."""

    __tablename__ = "scp_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))  # accepted | rejected | store_failed | conflict
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    peer: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)


class Heartbeat(Base):
    """Each long-running process (scp, completion, worker, api) upserts its row every few seconds,
    so the system page can show what is alive, on which device, without asking the broker."""

    __tablename__ = "heartbeats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    component: Mapped[str] = mapped_column(String(32))  # scp | completion | worker | api
    instance: Mapped[str] = mapped_column(String(200), unique=True)  # host:pid
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    info: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # e.g. active associations, device, queues


class GatewayReplica(Base):
    """One row per running gateway (SCP + completion), renewed with its heartbeat (issue 19).

    It is how "several replicas" is defined: more than one live row. On SQLite a gateway refuses to
    start beside another live one (one file, one node); on PostgreSQL the rows are the replica
    registry the system page and the completion claim log read. ``replica_id`` is the configured
    name (empty for the only gateway), ``owner`` the "host:pid" holding it.
    """

    __tablename__ = "gateway_replicas"

    replica_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    data_dir: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UserRole:
    """Dashboard roles. Viewers watch (patient identifiers masked); admins also act and see identifiers."""

    VIEWER = "viewer"
    ADMIN = "admin"

    ALL = (VIEWER, ADMIN)


class User(Base):
    """A local dashboard account (auth_mode "local"); the password is stored as an argon2 hash only."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default=UserRole.VIEWER)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditEntry(Base):
    """Who did what to which job from where: one row per dashboard action, login and logout."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user: Mapped[str | None] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(64))  # login, login_failed, logout, retry, repush, cancel, delete, ...
    target: Mapped[str | None] = mapped_column(String(200))  # e.g. "job:12"
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ip: Mapped[str | None] = mapped_column(String(64))


class ShadowRecord(Base):
    """Shadow validation (issue 17): one row per job whose study had both a synthetic and a
    DSC-derived Tmax map, so the dashboard can aggregate how the synthetic map performs at this site.

    Volumes in mL; ``dice_*`` is None when both regions are empty. Upserted by job (a retried job
    replaces its row). The rest of the comparison (HIR, mismatch, AIF quality) is in ``detail``.
    """

    __tablename__ = "shadow_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    dice_t6: Mapped[float | None] = mapped_column(Float)
    dice_t10: Mapped[float | None] = mapped_column(Float)
    synthetic_t6_ml: Mapped[float] = mapped_column(Float)
    real_t6_ml: Mapped[float] = mapped_column(Float)
    synthetic_t10_ml: Mapped[float] = mapped_column(Float)
    real_t10_ml: Mapped[float] = mapped_column(Float)
    core_ml: Mapped[float] = mapped_column(Float)
    synthetic_defuse3: Mapped[bool | None] = mapped_column(Boolean)
    real_defuse3: Mapped[bool | None] = mapped_column(Boolean)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
