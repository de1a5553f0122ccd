"""Shapes shared by the HTML pages and the JSON API: masking, previews, the system view.

Both front ends call these, so a viewer never sees on one what the other hides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from common.config import Settings
from common.jobstore import dashboard_queries as dq
from service.api.auth import Principal
from service.api.system import disk_status, queue_depths, software_versions

MASK = "•••"
_IDENTIFIER_FIELDS = ("patient_id", "patient_name")

# Preview files are listed in this order when their names say what they show.
_PREVIEW_ORDER = ("dwi", "adc", "flair", "core", "tmax", "sd", "uncert", "summary", "overlay")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?$")


def mask_study(study: dict[str, Any], principal: Principal) -> dict[str, Any]:
    if principal.sees_identifiers:
        return study
    return {**study, **{k: (MASK if study.get(k) else study.get(k)) for k in _IDENTIFIER_FIELDS}}


def mask_job(job: dict[str, Any], principal: Principal) -> dict[str, Any]:
    return {**job, "study": mask_study(job["study"], principal)}


def job_output_dir(settings: Settings, output_dir: str | None) -> Path | None:
    if not output_dir:
        return None
    path = Path(output_dir)
    if not path.is_absolute():
        path = settings.output_dir / path
    return path


def _preview_rank(name: str) -> tuple[int, str]:
    low = name.lower()
    for i, key in enumerate(_PREVIEW_ORDER):
        if key in low:
            return i, low
    return len(_PREVIEW_ORDER), low


def list_previews(settings: Settings, output_dir: str | None) -> list[str]:
    """PNG files in the job's output dir (and one level below), as safe relative names."""
    root = job_output_dir(settings, output_dir)
    if root is None or not root.is_dir():
        return []
    names = []
    for pattern in ("*.png", "*/*.png"):
        for p in root.glob(pattern):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and _SAFE_NAME.match(rel):
                names.append(rel)
    return sorted(set(names), key=_preview_rank)


def preview_path(settings: Settings, output_dir: str | None, name: str) -> Path | None:
    """The file to serve for ``name``, or None. Only names list_previews gives are served, and the
    resolved file must still lie inside the output dir (no traversal, no symlink escape)."""
    if name not in list_previews(settings, output_dir):
        return None
    root = job_output_dir(settings, output_dir)
    assert root is not None
    path = (root / name).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return None
    return path


def system_view(db: Session, settings: Settings) -> dict[str, Any]:
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
        "queues": queue_depths(settings),
        "disk": disk_status(settings),
        "jobs_by_state": dq.jobs_by_state(db),
        "deliveries_by_state": dq.deliveries_by_state(db),
        "software": software_versions(),
        "model": model,
        "destinations": [f"{d.ae_title}@{d.host}:{d.port}" + (" (TLS)" if d.tls else "") for d in settings.destinations],
    }
