"""Pydantic models of the JSON API: the OpenAPI spec clients (and schemathesis) read."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from common.jobstore.dashboard_queries import PIPELINE_STAGES

StageName = Literal["classify", "load", "core", "synthesize", "measure", "encode", "push"]
assert tuple(StageName.__args__) == PIPELINE_STAGES  # type: ignore[attr-defined]


class Me(BaseModel):
    username: str
    role: str
    via: str
    sees_identifiers: bool
    csrf_token: str = Field(description="Send back as X-CSRF-Token on every POST/DELETE")


class StudyOut(BaseModel):
    study_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    calling_aet: str | None
    first_received_at: str | None
    last_received_at: str | None


class StageStrip(BaseModel):
    name: str
    state: str
    duration_s: float | None


class DeliverySummary(BaseModel):
    destination: str
    state: str
    pending: int
    sent: int
    dead: int
    total: int


class JobSummary(BaseModel):
    id: int
    version: int
    state: str
    trigger: str
    current_stage: str | None
    progress: float
    cancel_requested: bool
    instance_count: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    elapsed_s: float | None
    error: str | None
    warning_count: int
    study: StudyOut
    stages: list[StageStrip]
    deliveries: list[DeliverySummary]
    delivery: str = Field(description="where the results went: sent, pending, dead (gave up), "
                          "not_configured (finished with no PACS configured) or none (not yet)")
    measures: dict[str, Any]


class JobList(BaseModel):
    total: int
    limit: int
    offset: int
    jobs: list[JobSummary]


class SeriesOut(BaseModel):
    series_uid: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    instances: int
    expected_instances: int | None
    first_received_at: str | None
    last_received_at: str | None
    role: str | None
    used_as: list[str] = Field(default_factory=list, description="inputs the pipeline chose it as")
    classification: Any = None


class StageLogEntry(BaseModel):
    id: int
    name: str
    state: str
    attempt: int
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    warnings: list[str]
    error: str | None
    detail: Any = None
    worker: str | None


class ObjectOut(BaseModel):
    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    file: str | None
    state: str
    attempts: int
    last_error: str | None
    last_status: int | None
    next_attempt_at: str | None
    delivered_at: str | None


class OtherJob(BaseModel):
    id: int
    version: int
    state: str
    created_at: str | None


class JobDetail(JobSummary):
    warnings: list[str]
    result: Any = None
    supersedes_job_id: int | None
    series: list[SeriesOut]
    classification: Any = None
    registration: Any = None
    stage_log: list[StageLogEntry]
    objects: list[ObjectOut]
    other_jobs: list[OtherJob]
    previews: list[str] = Field(description="PNG file names under /api/jobs/{id}/previews/{name}")


class RetryIn(BaseModel):
    stage: StageName = "classify"


class RepushIn(BaseModel):
    only_unsent: bool = False


class DeleteIn(BaseModel):
    confirm: str = Field(max_length=32, description="Repeat the job id to confirm")
    purge_study: bool = Field(default=False, description="Also delete the study's spool files and rows")


class ActionOut(BaseModel):
    job_id: int
    action: str
    state: str | None
    detail: dict[str, Any] = {}


class Heartbeat(BaseModel):
    component: str
    instance: str
    at: str | None
    age_s: float
    alive: bool
    not_alive_because: str = Field(default="", description="why a beating process does not count as alive")
    info: dict[str, Any]


class ScpEvent(BaseModel):
    at: str | None
    kind: str
    calling_aet: str | None
    peer: str | None
    reason: str | None


class QueueStatus(BaseModel):
    broker: str
    queues: dict[str, int | None]
    error: str | None


class DiskStatus(BaseModel):
    path: str
    free_mb: float
    total_mb: float
    watermark_mb: int
    above_watermark: bool


class SystemOut(BaseModel):
    ae_title: str
    scp_port: int
    active_associations: int
    scp: list[Heartbeat]
    workers: list[Heartbeat]
    other_processes: list[Heartbeat]
    recent_rejections: list[ScpEvent]
    recent_events: list[ScpEvent]
    queues: QueueStatus
    disk: DiskStatus
    jobs_by_state: dict[str, int]
    studies_by_state: dict[str, int] = Field(description="studies counted by the state of their latest job")
    deliveries_by_state: dict[str, int]
    software: dict[str, str]
    model: dict[str, Any]
    celery_workers: list[str] | None = Field(description="nodes answering a broker ping (Redis only)")
    recent_stage_workers: list[dict[str, Any]] = Field(description="workers that ran a stage in the last 30 min")
    destinations: list[str]
    destination_states: list[dict[str, Any]] = Field(
        description="per destination: kind (C-STORE or STOW-RS), state, pending/sent/dead counts, last error")
    inference_runtimes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="per worker machine: the Tmax inference path in use and every candidate's measured time and "
        "max |dTmax| against fp32 (models.tmax_ddpm.runtime), newest first")


class AuditOut(BaseModel):
    id: int
    at: str | None
    user: str | None
    action: str
    target: str | None
    detail: Any = None
    ip: str | None


class Health(BaseModel):
    status: str
    checks: dict[str, Any] = {}
