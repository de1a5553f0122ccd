"""Reads of the shadow-validation records (issue 17) for the dashboard page, its API and CSV."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.jobstore.models import ShadowRecord

#: columns of the JSON rows and the CSV export, in order
COLUMNS = ("job_id", "study_uid", "at", "model_name", "model_version", "dice_t6", "dice_t10", "synthetic_t6_ml",
           "real_t6_ml", "diff_t6_ml", "synthetic_t10_ml", "real_t10_ml", "diff_t10_ml", "core_ml",
           "synthetic_defuse3", "real_defuse3", "defuse3_agree")


def _row(r: ShadowRecord) -> dict[str, Any]:
    at = r.at if r.at.tzinfo else r.at.replace(tzinfo=UTC)  # SQLite returns naive datetimes
    agree = None if r.synthetic_defuse3 is None or r.real_defuse3 is None else r.synthetic_defuse3 == r.real_defuse3
    return {"job_id": r.job_id, "study_uid": r.study_uid, "at": at.isoformat(), "model_name": r.model_name,
            "model_version": r.model_version, "dice_t6": r.dice_t6, "dice_t10": r.dice_t10,
            "synthetic_t6_ml": r.synthetic_t6_ml, "real_t6_ml": r.real_t6_ml,
            "diff_t6_ml": round(r.synthetic_t6_ml - r.real_t6_ml, 2), "synthetic_t10_ml": r.synthetic_t10_ml,
            "real_t10_ml": r.real_t10_ml, "diff_t10_ml": round(r.synthetic_t10_ml - r.real_t10_ml, 2),
            "core_ml": r.core_ml, "synthetic_defuse3": r.synthetic_defuse3, "real_defuse3": r.real_defuse3,
            "defuse3_agree": agree}


def shadow_rows(db: Session, since: date | None = None, until: date | None = None,
                model_version: str | None = None, limit: int = 100_000) -> list[dict[str, Any]]:
    """Records from ``since`` to ``until`` (whole UTC days, both included), of one model version if
    given, oldest first."""
    q = select(ShadowRecord).order_by(ShadowRecord.at, ShadowRecord.id).limit(limit)
    if since is not None:
        q = q.where(ShadowRecord.at >= datetime.combine(since, time.min, UTC))
    if until is not None:
        q = q.where(ShadowRecord.at < datetime.combine(until + timedelta(days=1), time.min, UTC))
    if model_version:
        q = q.where(ShadowRecord.model_version == model_version)
    return [_row(r) for r in db.scalars(q)]


def model_versions(db: Session) -> list[str]:
    """Every model version with a record, for the page's filter."""
    return sorted(v for v in db.scalars(select(ShadowRecord.model_version).distinct()) if v)
