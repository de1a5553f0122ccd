"""Shapes shared by the HTML pages and the JSON API: masking, previews, the system view.

Both front ends call these, so a viewer never sees on one what the other hides.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.config import Settings, StowDestination
from common.jobstore import dashboard_queries as dq
from common.jobstore.models import Delivery, DeliveryState
from service.api import previews
from service.api.auth import Principal
from service.api.system import (
    celery_workers,
    disk_status,
    inference_runtimes,
    queue_depths,
    software_versions,
)

MASK = "•••"
_IDENTIFIER_FIELDS = ("patient_id", "patient_name")



def mask_study(study: dict[str, Any], principal: Principal) -> dict[str, Any]:
    if principal.sees_identifiers:
        return study
    return {**study, **{k: (MASK if study.get(k) else study.get(k)) for k in _IDENTIFIER_FIELDS}}


def delivery_of(job: dict[str, Any]) -> str:
    """One word for where a job's results went, from its per-destination delivery summary.

    A finished job with no delivery row had no PACS configured when it encoded: it is
    ``not_configured``, never ``sent`` (a newcomer's demo job must not read "delivered").
    """
    states = {d["state"] for d in job.get("deliveries") or []}
    if not states:
        return "not_configured" if job.get("state") == "done" else "none"
    for word in ("dead", "pending"):
        if word in states:
            return word
    return "sent"


def mask_job(job: dict[str, Any], principal: Principal) -> dict[str, Any]:
    return {**job, "delivery": delivery_of(job), "study": mask_study(job["study"], principal)}


def job_output_dir(settings: Settings, output_dir: str | None) -> Path | None:
    if not output_dir:
        return None
    path = Path(output_dir)
    if not path.is_absolute():
        path = settings.output_dir / path
    return path


def list_previews(settings: Settings, output_dir: str | None) -> list[str]:
    return previews.list_previews(job_output_dir(settings, output_dir))


def preview_path(settings: Settings, output_dir: str | None, name: str) -> Path | None:
    """The PNG file to serve for ``name``, or None. Only names list_previews gives are served, and
    the resolved file must still lie inside the output dir (no traversal, no symlink escape)."""
    root = job_output_dir(settings, output_dir)
    if root is None or name not in previews.list_previews(root):
        return None
    path = (root / name).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return None
    return path if path.is_file() else None


def rendered_preview(settings: Settings, output_dir: str | None, name: str) -> bytes | None:
    root = job_output_dir(settings, output_dir)
    if root is None or name not in previews.list_previews(root):
        return None
    return previews.render(root, name)


def destination_states(db: Session, settings: Settings) -> list[dict[str, Any]]:
    """Per configured destination (C-STORE or STOW-RS): objects waiting, sent and given up, and the
    newest error of a waiting or given-up object, so the system page shows which PACS is down."""
    rows = db.execute(
        select(Delivery.destination, Delivery.state, func.count(Delivery.id)).group_by(Delivery.destination,
                                                                                      Delivery.state)
    ).all()
    out = []
    for d in settings.destinations:
        counts = {s: int(n) for dest, s, n in rows if dest == d.key}
        last = db.scalars(
            select(Delivery.last_error).where(Delivery.destination == d.key, Delivery.last_error.is_not(None),
                                              Delivery.state != DeliveryState.SENT)
            .order_by(Delivery.next_attempt_at.desc()).limit(1)
        ).first()
        pending, dead = counts.get(DeliveryState.PENDING, 0), counts.get(DeliveryState.DEAD, 0)
        out.append({
            "destination": d.key, "kind": "STOW-RS" if isinstance(d, StowDestination) else "C-STORE",
            "state": "dead" if dead else "pending" if pending else "sent" if counts else "idle",
            "pending": pending, "sent": counts.get(DeliveryState.SENT, 0), "dead": dead, "last_error": last,
        })
    return out


def system_view(db: Session, settings: Settings, celery_app: Any = None) -> dict[str, Any]:
    beats = dq.heartbeats(db)
    scp = [b for b in beats if b["component"] == "scp"]
    workers = [b for b in beats if b["component"] == "worker"]
    others = [b for b in beats if b["component"] not in ("scp", "worker")]
    active = 0
    for b in scp:
        if b["alive"]:
            try:
                active += int(b["info"].get("active_associations", 0) or 0)
            except (TypeError, ValueError):
                pass
    model: dict[str, Any] = {"configured": settings.model_name}
    for b in workers:
        if b["alive"]:
            for key, value in b["info"].items():
                if "model" in key and key not in model:
                    model[key] = value
    queues = queue_depths(settings)
    versions = dq.latest_versions(db)
    if versions:
        model["last_job_versions"] = versions
    return {
        "ae_title": settings.ae_title,
        "scp_port": settings.scp_port,
        "active_associations": active,
        "scp": scp,
        "workers": workers,
        "other_processes": others,
        "recent_rejections": dq.recent_scp_events(db, kinds=("rejected",), limit=20),
        "recent_events": dq.recent_scp_events(db, limit=20),
        "queues": queues,
        "disk": disk_status(settings),
        "jobs_by_state": dq.jobs_by_state(db),
        "studies_by_state": dq.studies_by_state(db),
        "deliveries_by_state": dq.deliveries_by_state(db),
        "software": software_versions(),
        "model": model,
        "inference_runtimes": inference_runtimes(settings),
        "celery_workers": celery_workers(settings, celery_app) if celery_app is not None and not queues["error"] else None,
        "recent_stage_workers": dq.recent_stage_workers(db, datetime.now(UTC) - timedelta(minutes=30)),
        "destinations": [d.key + (" (TLS)" if getattr(d, "tls", False) else "") for d in settings.destinations],
        "destination_states": destination_states(db, settings),
    }
