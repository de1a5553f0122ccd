"""Jinja2 environment of the dashboard, with the filters the templates use for times and sizes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.templating import Jinja2Templates

from service.api.previews import title_of

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")

# What each job state means, in words for the person on call.
STATE_WORDS = {
    "queued": "waiting for a worker",
    "running": "pipeline running",
    "delivering": "results written, sending to PACS",
    "done": "delivered",
    "failed": "failed — see the error",
    "input_missing": "a required series did not arrive",
    "cancelled": "cancelled",
    "superseded": "replaced by a newer job for this study",
    "poisoned": "the worker died in the same stage again and again — see the error",
    "waiting": "not started",
    "pending": "waiting to send",
    "sent": "sent",
    "dead": "gave up — re-push when PACS is back",
    "skipped": "skipped",
}


NOT_DELIVERED_WORDS = "done, not delivered (no PACS configured)"


def job_words(job: Any) -> str:
    """STATE_WORDS for a job, except that a finished job that had no PACS to go to says so."""
    if job.get("state") == "done" and job.get("delivery") == "not_configured":
        return NOT_DELIVERED_WORDS
    return STATE_WORDS.get(job.get("state"), "")


def _parse(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def hhmm(value: Any) -> str:
    """UTC time of day, with the date when it is not today."""
    dt = _parse(value)
    if dt is None:
        return "—"
    dt = dt.astimezone(UTC)
    now = datetime.now(UTC)
    if dt.date() == now.date():
        return dt.strftime("%H:%M:%S")
    return dt.strftime("%Y-%m-%d %H:%M")


def ago(value: Any) -> str:
    dt = _parse(value)
    if dt is None:
        return "—"
    return duration((datetime.now(UTC) - dt).total_seconds()) + " ago"


def duration(seconds: Any) -> str:
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def person_name(value: Any) -> str:
    """DICOM PN "DOE^JANE^^DR" as "DOE, JANE" (other text unchanged)."""
    if not isinstance(value, str) or "^" not in value:
        return value or "—"
    parts = [p for p in value.split("=")[0].split("^") if p]
    return ", ".join([parts[0], " ".join(parts[1:])]) if len(parts) > 1 else (parts[0] if parts else "—")


def evidence_lines(value: Any) -> list[str]:
    """The classifier's evidence as lines: [rule, field, value] triples read "field = value (rule)"."""
    if not isinstance(value, list):
        return [str(value)]
    lines = []
    for item in value:
        if isinstance(item, list | tuple) and len(item) == 3:
            rule, fld, val = item
            lines.append(f"{fld} = {val}  ({rule})")
        else:
            lines.append(str(item))
    return lines


def device_of(worker_label: Any) -> str:
    """"host:pid cuda:0" -> "cuda:0" (the pipeline's worker label ends with the device)."""
    text = str(worker_label or "")
    if "(" in text and text.endswith(")"):
        return text.rsplit("(", 1)[1][:-1]
    return text.rsplit(" ", 1)[1] if " " in text else ""


def info_value(key: str, value: Any) -> str:
    """A heartbeat info value for people: epoch seconds under *_at keys become a time."""
    if key.endswith("_at") and isinstance(value, int | float) and value > 1e9:
        return hhmm(datetime.fromtimestamp(value, UTC))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def groupby_pair(objects: list[dict[str, Any]]) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
    """Delivery rows grouped by (destination, SOP class), in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for o in objects:
        groups.setdefault((o["destination"], o["sop_class_uid"]), []).append(o)
    return list(groups.items())


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def is_mapping(value: Any) -> bool:
    return isinstance(value, dict)


templates.env.filters.update(info_value=info_value, groupby_pair=groupby_pair, device_of=device_of, evidence_lines=evidence_lines, pn=person_name, hhmm=hhmm, ago=ago, duration=duration, number=number, pretty_json=pretty_json)
templates.env.tests["mapping_"] = is_mapping
templates.env.globals.update(STATE_WORDS=STATE_WORDS, info_value=info_value, job_words=job_words)

SOP_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color SC",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
}
MEASURE_LABELS = {
    "core_ml": ("Infarct core (ADC < 620)", "mL"),
    "tmax6_ml": ("Hypoperfusion Tmax > 6 s", "mL"),
    "tmax10_ml": ("Severe Tmax > 10 s", "mL"),
    "mismatch_ml": ("Mismatch volume", "mL"),
    "mismatch_ratio": ("Mismatch ratio", ""),
    "hir": ("HIR (Tmax>10 / Tmax>6)", ""),
    "defuse3": ("DEFUSE-3 target mismatch", ""),
    "extend": ("EXTEND criteria", ""),
}
templates.env.globals.update(SOP_CLASS_NAMES=SOP_CLASS_NAMES, MEASURE_LABELS=MEASURE_LABELS, preview_title=title_of)
