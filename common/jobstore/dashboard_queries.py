"""Read-only queries behind the admin dashboard and its JSON API.

Everything here only reads the job store and returns plain JSON-ready dicts, so the HTML pages,
the JSON API and the Prometheus collector all show the same numbers. Masking of patient
identifiers is the caller's job (it depends on the viewer's role), never the query's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from common.jobstore.models import (
    AuditEntry,
    Delivery,
    DeliveryState,
    Heartbeat,
    Instance,
    Job,
    JobState,
    ScpEvent,
    Series,
    Stage,
    StageState,
    Study,
)

# The pipeline's stages in order; the dashboard shows these as a progress strip even before a
# stage row exists. Stage rows with other names (a pipeline that grows a step) are shown too.
PIPELINE_STAGES = ("classify", "load", "core", "synthesize", "measure", "encode", "push")

# The measure keys the pipeline writes into Job.result (directly or under "measures").
MEASURE_KEYS = ("core_ml", "tmax6_ml", "tmax10_ml", "mismatch_ml", "mismatch_ratio", "hir", "defuse3", "extend",
                "confidence")

ALL_JOB_STATES = (*JobState.ACTIVE, *JobState.FINAL)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite drops the zone; everything we write is UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _elapsed(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    start, end = _aware(start), _aware(end)
    if start is None:
        return None
    return max(0.0, ((end or now) - start).total_seconds())


def measures_of(result: dict[str, Any] | None) -> dict[str, Any]:
    """The clinical measures from a job result, wherever the pipeline put them."""
    if not isinstance(result, dict):
        return {}
    source = result.get("measures") if isinstance(result.get("measures"), dict) else result
    return {k: source[k] for k in MEASURE_KEYS if k in source}


@dataclass(frozen=True)
class JobFilter:
    """Filters of the jobs list; None means "any"."""

    state: str | None = None
    calling_aet: str | None = None
    accession: str | None = None  # substring, case-insensitive
    date_from: date | None = None  # on Job.created_at (UTC), inclusive
    date_to: date | None = None  # inclusive
    limit: int = 50
    offset: int = 0

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in ALL_JOB_STATES and self.state != "active":
            raise ValueError(f"state {self.state!r} is not one of {', '.join(ALL_JOB_STATES)} or 'active'")
        if not 1 <= self.limit <= 500:
            raise ValueError(f"limit {self.limit} must be between 1 and 500")
        if self.offset < 0:
            raise ValueError(f"offset {self.offset} must not be negative")


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _study_dict(study: Study) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "calling_aet": study.calling_aet,
        "first_received_at": _iso(study.first_received_at),
        "last_received_at": _iso(study.last_received_at),
    }


def _delivery_summary(counts: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """Per destination: counts by state and one overall state, from (destination, state, n) triples."""
    per: dict[str, dict[str, int]] = defaultdict(lambda: {"pending": 0, "sent": 0, "dead": 0, "total": 0})
    for dest, state, n in counts:
        c = per[dest]
        c[state if state in (DeliveryState.PENDING, DeliveryState.SENT, DeliveryState.DEAD) else "pending"] += n
        c["total"] += n
    out = []
    for dest, c in sorted(per.items()):
        state = "dead" if c["dead"] else "pending" if c["pending"] else "sent"
        out.append({"destination": dest, "state": state, **c})
    return out


def _stage_strip(stages: list[Stage], now: datetime) -> list[dict[str, Any]]:
    """One entry per pipeline stage (latest attempt wins), in pipeline order, then any extras."""
    latest: dict[str, Stage] = {}
    for st in stages:  # ordered by id, so later attempts overwrite
        latest[st.name] = st
    names = list(PIPELINE_STAGES) + [n for n in latest if n not in PIPELINE_STAGES]
    strip = []
    for name in names:
        st = latest.get(name)
        if st is None:
            strip.append({"name": name, "state": "waiting", "duration_s": None})
        else:
            dur = st.duration_s
            if dur is None:
                dur = _elapsed(st.started_at, st.finished_at, now)
            strip.append({"name": name, "state": st.state, "duration_s": dur})
    return strip


def _summary(job: Job, stages: list[Stage], deliveries: list[tuple[str, str, int]], now: datetime) -> dict[str, Any]:
    return {
        "id": job.id,
        "version": job.version,
        "state": job.state,
        "trigger": job.trigger,
        "current_stage": job.current_stage,
        "progress": float(job.progress or 0.0),
        "cancel_requested": bool(job.cancel_requested),
        "instance_count": job.instance_count,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "elapsed_s": _elapsed(job.started_at or job.created_at, job.finished_at, now),
        "error": job.error,
        "warning_count": len(job.warnings or []),
        "study": _study_dict(job.study),
        "stages": _stage_strip(stages, now),
        "deliveries": _delivery_summary(deliveries),
        "measures": measures_of(job.result),
    }


def list_jobs(session: Session, flt: JobFilter, now: datetime | None = None) -> tuple[int, list[dict[str, Any]]]:
    """(total matching, one page of job summaries), newest first."""
    now = now or datetime.now(UTC)
    q = select(Job).join(Study, Job.study_id == Study.id)
    if flt.state == "active":
        q = q.where(Job.state.in_(JobState.ACTIVE))
    elif flt.state:
        q = q.where(Job.state == flt.state)
    if flt.calling_aet:
        q = q.where(Study.calling_aet == flt.calling_aet)
    if flt.accession:
        q = q.where(Study.accession_number.ilike(f"%{_like_escape(flt.accession)}%", escape="\\"))
    if flt.date_from:
        q = q.where(Job.created_at >= datetime.combine(flt.date_from, time.min, tzinfo=UTC))
    if flt.date_to:
        q = q.where(Job.created_at < datetime.combine(flt.date_to + timedelta(days=1), time.min, tzinfo=UTC))
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    jobs = list(
        session.scalars(
            q.options(selectinload(Job.study)).order_by(Job.created_at.desc(), Job.id.desc())
            .limit(flt.limit).offset(flt.offset)
        )
    )
    ids = [j.id for j in jobs]
    stages: dict[int, list[Stage]] = defaultdict(list)
    deliveries: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    if ids:
        for st in session.scalars(select(Stage).where(Stage.job_id.in_(ids)).order_by(Stage.id)):
            stages[st.job_id].append(st)
        # counted in SQL: a job has dozens of objects per destination
        for job_id, dest, state, n in session.execute(
            select(Delivery.job_id, Delivery.destination, Delivery.state, func.count(Delivery.id))
            .where(Delivery.job_id.in_(ids)).group_by(Delivery.job_id, Delivery.destination, Delivery.state)
        ):
            deliveries[job_id].append((dest, state, int(n)))
    return total, [_summary(j, stages[j.id], deliveries[j.id], now) for j in jobs]


def calling_aets(session: Session) -> list[str]:
    """Every calling AE seen, for the filter drop-down."""
    return sorted(a for a in session.scalars(select(Study.calling_aet).distinct()) if a)


def _series_role_index(classify_detail: Any) -> dict[str, Any]:
    """Map SeriesInstanceUID -> the classifier's record, whatever shape the detail JSON has.

    Accepts a list of records carrying a series uid, a dict keyed by series uid, or such a list or
    dict under "series" / "classification". Unknown shapes give an empty index (the raw detail is
    still shown on the page).
    """
    uid_keys = ("series_uid", "series_instance_uid", "SeriesInstanceUID", "uid")

    def from_obj(obj: Any) -> dict[str, Any]:
        index: dict[str, Any] = {}
        if isinstance(obj, list):
            for rec in obj:
                if isinstance(rec, dict):
                    for k in uid_keys:
                        if isinstance(rec.get(k), str):
                            index[rec[k]] = rec
                            break
        elif isinstance(obj, dict):
            for k, rec in obj.items():
                if isinstance(rec, dict) and isinstance(k, str) and k[:1].isdigit() and "." in k:
                    index[k] = rec
        return index

    if not isinstance(classify_detail, dict | list):
        return {}
    index = from_obj(classify_detail)
    if not index and isinstance(classify_detail, dict):
        for key in ("series", "classification", "classifications", "decisions"):
            index = from_obj(classify_detail.get(key))
            if index:
                break
    return index


def _selection_index(classify_detail: Any) -> dict[str, list[str]]:
    """SeriesInstanceUID -> the inputs it was chosen as ("dwi", "b0", "adc", "flair", ...).

    Looks for a mapping of input name -> {series uid} anywhere one level down in the detail
    (e.g. {"selection": {"dwi": {"series_instance_uid": ...}, "flair": {...}}}).
    """
    used: dict[str, list[str]] = defaultdict(list)
    if not isinstance(classify_detail, dict):
        return used
    candidates = [classify_detail, *[v for v in classify_detail.values() if isinstance(v, dict)]]
    for cand in candidates:
        for name in ("dwi", "b0", "adc", "flair", "dsc"):
            ref = cand.get(name)
            if isinstance(ref, dict):
                uid = ref.get("series_instance_uid") or ref.get("series_uid")
                if isinstance(uid, str) and name not in used[uid]:
                    used[uid].append(name)
    return used


def _role_of(rec: dict[str, Any]) -> str | None:
    for k in ("role", "label", "class"):
        if isinstance(rec.get(k), str):
            return rec[k]
    return None


def _find_registration(stages: list[Stage], result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The registration quality record (metric before/after), from the load stage or the result."""
    candidates: list[Any] = []
    for st in stages:
        if isinstance(st.detail, dict):
            candidates.append(st.detail)
    if isinstance(result, dict):
        candidates.append(result)
    for cand in candidates:
        for key, value in cand.items():
            if "regist" in str(key).lower() and isinstance(value, dict):
                return value
    return None


def job_detail(session: Session, job_id: int, now: datetime | None = None) -> dict[str, Any] | None:
    """Everything the job page shows, or None when there is no such job."""
    now = now or datetime.now(UTC)
    job = session.get(Job, job_id)
    if job is None:
        return None
    stages = list(job.stages)
    deliveries = list(job.deliveries)
    base = _summary(job, stages, [(d.destination, d.state, 1) for d in deliveries], now)

    classify_detail = None
    for st in stages:
        if st.name == "classify" and st.detail is not None:
            classify_detail = st.detail  # latest attempt wins
    roles = _series_role_index(classify_detail)
    used_as = _selection_index(classify_detail)

    counts = dict(
        session.execute(
            select(Instance.series_id, func.count(Instance.id))
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == job.study_id)
            .group_by(Instance.series_id)
        ).all()
    )
    series = []
    for s in sorted(job.study.series, key=lambda s: (s.series_number is None, s.series_number or 0, s.id)):
        rec = roles.get(s.series_uid)
        series.append({
            "series_uid": s.series_uid,
            "series_number": s.series_number,
            "modality": s.modality,
            "series_description": s.series_description,
            "instances": int(counts.get(s.id, 0)),
            "expected_instances": s.expected_instances,
            "first_received_at": _iso(s.first_received_at),
            "last_received_at": _iso(s.last_received_at),
            "role": _role_of(rec) if rec else None,
            "used_as": used_as.get(s.series_uid, []),
            "classification": rec,
        })

    other_jobs = [
        {"id": j.id, "version": j.version, "state": j.state, "created_at": _iso(j.created_at)}
        for j in sorted(job.study.jobs, key=lambda j: j.version)
        if j.id != job.id
    ]
    base.update({
        "warnings": list(job.warnings or []),
        "result": job.result,
        "output_dir": job.output_dir,
        "supersedes_job_id": job.supersedes_job_id,
        "series": series,
        "classification": classify_detail,
        "registration": _find_registration(stages, job.result),
        "stage_log": [
            {
                "id": st.id,
                "name": st.name,
                "state": st.state,
                "attempt": st.attempt,
                "started_at": _iso(st.started_at),
                "finished_at": _iso(st.finished_at),
                "duration_s": st.duration_s if st.duration_s is not None else _elapsed(st.started_at, st.finished_at, now),
                "warnings": list(st.warnings or []),
                "error": st.error,
                "detail": st.detail,
                "worker": st.worker,
            }
            for st in stages
        ],
        "objects": [
            {
                "id": d.id,
                "destination": d.destination,
                "sop_instance_uid": d.sop_instance_uid,
                "sop_class_uid": d.sop_class_uid,
                "file": d.path.rsplit("/", 1)[-1] if d.path else None,
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "last_status": d.last_status,
                "next_attempt_at": _iso(d.next_attempt_at),
                "delivered_at": _iso(d.delivered_at),
            }
            for d in deliveries
        ],
        "other_jobs": other_jobs,
    })
    return base


# --------------------------------------------------------------------------- system page


WORKER_STALE_S = 20.0  # a worker beats every 5 s: four missed beats and it no longer counts


def liveness(component: str, age_s: float, info: dict[str, Any], stale_after_s: float = 60.0) -> tuple[bool, str]:
    """(alive, why not) for one heartbeat.

    A worker counts as alive only if it beat recently *and* its pool can run tasks: the main Celery
    process keeps beating (and answering pings) while every pool process it starts dies before it is
    up, and such a worker processes nothing (issue 16).
    """
    limit = min(stale_after_s, WORKER_STALE_S) if component == "worker" else stale_after_s
    if age_s > limit:
        return False, f"no heartbeat for {age_s:.0f} s"
    if component == "worker" and info.get("pool_ready") is False:
        return False, "its pool cannot run tasks (no pool process up)"
    return True, ""


def heartbeats(session: Session, now: datetime | None = None, stale_after_s: float = 60.0) -> list[dict[str, Any]]:
    """Every process that ever beat, with its age and whether it counts as alive (and why not)."""
    now = now or datetime.now(UTC)
    out = []
    for hb in session.scalars(select(Heartbeat).order_by(Heartbeat.component, Heartbeat.instance)):
        age = _elapsed(hb.at, now, now) or 0.0
        alive, why = liveness(hb.component, age, hb.info or {}, stale_after_s)
        out.append({
            "component": hb.component,
            "instance": hb.instance,
            "at": _iso(hb.at),
            "age_s": age,
            "alive": alive,
            "not_alive_because": why,
            "info": hb.info or {},
        })
    return out


def workers_lost(session: Session) -> int:
    """Stage attempts whose worker died (closed by a lease takeover or the reaper)."""
    return int(session.scalar(select(func.count(Stage.id)).where(Stage.error.like("worker lost%"))) or 0)


def recent_scp_events(session: Session, kinds: tuple[str, ...] | None = None, limit: int = 20) -> list[dict[str, Any]]:
    q = select(ScpEvent).order_by(ScpEvent.at.desc(), ScpEvent.id.desc()).limit(limit)
    if kinds:
        q = q.where(ScpEvent.kind.in_(kinds))
    return [
        {"at": _iso(e.at), "kind": e.kind, "calling_aet": e.calling_aet, "peer": e.peer, "reason": e.reason}
        for e in session.scalars(q)
    ]


def jobs_by_state(session: Session) -> dict[str, int]:
    counts = {s: 0 for s in ALL_JOB_STATES}
    for state, n in session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)):
        counts[state] = int(n)
    return counts


def studies_by_state(session: Session) -> dict[str, int]:
    """Studies counted by the state of their latest job (highest version).

    A study that arrived in pieces can have several jobs: an early one that failed on part of it
    (``input_missing``: "no FLAIR") and a follow-up that succeeded. The study's outcome is its
    latest job's, so such a study counts once, as done, and never as a failure.
    """
    latest = select(Job.study_id, func.max(Job.version).label("v")).group_by(Job.study_id).subquery()
    q = (
        select(Job.state, func.count(Job.id))
        .join(latest, (latest.c.study_id == Job.study_id) & (latest.c.v == Job.version))
        .group_by(Job.state)
    )
    counts = {s: 0 for s in ALL_JOB_STATES}
    for state, n in session.execute(q):
        counts[state] = int(n)
    return counts


def scp_event_counts(session: Session) -> dict[str, int]:
    return {k: int(n) for k, n in session.execute(select(ScpEvent.kind, func.count(ScpEvent.id)).group_by(ScpEvent.kind))}


def instance_count(session: Session) -> int:
    return int(session.scalar(select(func.count(Instance.id))) or 0)


def deliveries_by_state(session: Session) -> dict[str, int]:
    counts = {DeliveryState.PENDING: 0, DeliveryState.SENT: 0, DeliveryState.DEAD: 0}
    for state, n in session.execute(select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)):
        counts[state] = int(n)
    return counts


def failed_delivery_attempts(session: Session) -> int:
    """C-STORE attempts that did not succeed: every attempt of a non-sent row, all but the last of a sent one."""
    total = int(session.scalar(select(func.coalesce(func.sum(Delivery.attempts), 0))) or 0)
    sent = int(session.scalar(select(func.count(Delivery.id)).where(Delivery.state == DeliveryState.SENT)) or 0)
    return max(0, total - sent)


def stage_durations(session: Session) -> list[tuple[str, float]]:
    """(stage name, seconds) of every finished stage, for the duration histogram."""
    q = select(Stage.name, Stage.duration_s).where(
        Stage.duration_s.is_not(None), Stage.state.in_((StageState.DONE, StageState.FAILED))
    )
    return [(n, float(d)) for n, d in session.execute(q)]


def latest_versions(session: Session) -> dict[str, Any]:
    """Software and model versions as the most recent finished job recorded them."""
    q = select(Job.result).where(Job.result.is_not(None)).order_by(Job.id.desc()).limit(20)
    for result in session.scalars(q):
        if isinstance(result, dict):
            for key in ("versions", "version", "software"):
                if isinstance(result.get(key), dict):
                    return dict(result[key])
    return {}


def audit_log(session: Session, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    q = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit).offset(offset)
    return [
        {"id": a.id, "at": _iso(a.at), "user": a.user, "action": a.action, "target": a.target,
         "detail": a.detail, "ip": a.ip}
        for a in session.scalars(q)
    ]


def recent_stage_workers(session: Session, since: datetime) -> list[dict[str, Any]]:
    """Workers (``host:pid device`` as the pipeline labels them) that ran a stage since ``since``."""
    q = (
        select(Stage.worker, func.max(Stage.started_at), func.count(Stage.id))
        .where(Stage.worker.is_not(None), Stage.started_at >= since)
        .group_by(Stage.worker)
        .order_by(func.max(Stage.started_at).desc())
    )
    return [{"worker": w, "last_stage_at": _iso(at), "stages": int(n)} for w, at, n in session.execute(q)]


def receiving_studies(session: Session, window_s: float, now: datetime | None = None) -> list[dict[str, Any]]:
    """Studies receiving images right now: an instance arrived within ``window_s`` and no job covers
    all of them yet (no job, or the newest job counted fewer instances)."""
    now = now or datetime.now(UTC)
    since = now - timedelta(seconds=window_s)
    recent = list(session.scalars(select(Study).where(Study.last_received_at >= since)
                                  .order_by(Study.last_received_at.desc()).limit(100)))
    if not recent:
        return []
    ids = [st.id for st in recent]
    counts = {
        sid: (int(n), int(ns))
        for sid, n, ns in session.execute(
            select(Series.study_id, func.count(Instance.id), func.count(func.distinct(Series.id)))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id)
        )
    }
    covered = dict(session.execute(
        select(Job.study_id, func.max(Job.instance_count)).where(Job.study_id.in_(ids)).group_by(Job.study_id)
    ).all())
    out = []
    for study in recent:
        n, n_series = counts.get(study.id, (0, 0))
        if n == 0 or (covered.get(study.id) is not None and covered[study.id] >= n):
            continue
        out.append({"study": _study_dict(study), "instances": n, "series": n_series,
                    "quiet_s": _elapsed(study.last_received_at, now, now)})
    return out
