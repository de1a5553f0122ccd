"""Shadow validation: on every study that brought a DSC series, compare the synthetic Tmax with the
DSC-derived one and keep the comparison, so a site learns how the synthetic map performs on its own
patients (the only honest evidence of that; the dashboard's shadow page aggregates the records).

The comparison uses the measures both maps already have (computed by the same rules,
worker.pipeline.measure) plus the overlap of their Tmax>6 s and Tmax>10 s regions.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import select

from common.jobstore.db import session_scope
from common.jobstore.models import ShadowRecord


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two masks; None when both are empty (agreement on nothing is not a number)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return None if s == 0 else round(2.0 * float((a & b).sum()) / s, 4)


def compare(synthetic_tmax: np.ndarray, real_tmax: np.ndarray, brain: np.ndarray, synthetic: Mapping[str, Any],
            real: Mapping[str, Any], thresholds_s: tuple[float, float] = (6.0, 10.0)) -> dict[str, Any]:
    """The shadow comparison of one study (JSON-ready): Dice at both thresholds, volumes and their
    differences (synthetic minus DSC), DEFUSE-3 and EXTEND calls of each."""
    b = np.asarray(brain, bool)
    s = np.nan_to_num(np.asarray(synthetic_tmax, np.float32), nan=0.0)
    r = np.nan_to_num(np.asarray(real_tmax, np.float32), nan=0.0)
    out: dict[str, Any] = {}
    for name, thr in zip(("t6", "t10"), thresholds_s, strict=True):
        out[f"dice_{name}"] = dice((s > thr) & b, (r > thr) & b)
        sv = float(synthetic.get(f"tmax{name[1:]}_ml") or 0.0)
        rv = float(real.get(f"tmax{name[1:]}_ml") or 0.0)
        out[f"synthetic_{name}_ml"] = round(sv, 2)
        out[f"real_{name}_ml"] = round(rv, 2)
        out[f"diff_{name}_ml"] = round(sv - rv, 2)
    for flag in ("defuse3", "extend"):
        sv, rv = synthetic.get(flag), real.get(flag)
        out[f"synthetic_{flag}"] = None if sv is None else bool(sv)
        out[f"real_{flag}"] = None if rv is None else bool(rv)
    out["defuse3_agree"] = (None if out["synthetic_defuse3"] is None or out["real_defuse3"] is None
                            else out["synthetic_defuse3"] == out["real_defuse3"])
    out["core_ml"] = round(float(synthetic.get("core_ml") or 0.0), 2)
    return out


def store(url: str, job_id: int, study_uid: str, model_name: str, model_version: str, comparison: Mapping[str, Any],
          detail: Mapping[str, Any] | None = None) -> int:
    """Insert or replace the job's shadow record; returns its id."""
    values = {k: comparison[k] for k in ("dice_t6", "dice_t10", "synthetic_t6_ml", "real_t6_ml", "synthetic_t10_ml",
                                         "real_t10_ml", "core_ml", "synthetic_defuse3", "real_defuse3")}
    with session_scope(url) as s:
        row = s.scalars(select(ShadowRecord).where(ShadowRecord.job_id == job_id)).first()
        if row is None:
            row = ShadowRecord(job_id=job_id)
            s.add(row)
        row.study_uid = study_uid[:64]
        row.at = datetime.now(UTC)
        row.model_name = model_name[:200]
        row.model_version = (model_version or "unknown")[:64]
        for k, v in values.items():
            setattr(row, k, v)
        row.detail = {**comparison, **(detail or {})}
        s.flush()
        return int(row.id)


def shadow_for_job(ctx: Any, real: dict[str, Any], synthetic_tmax: np.ndarray, brain: np.ndarray,
                   synthetic: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    """The measure stage's shadow step: adds ``shadow`` (the comparison) to the perfusion entry and,
    for a job of the job store, stores its record. Nothing when the DSC gave no map."""
    npz = (real.get("outputs") or {}).get("npz")
    if real.get("error") or not npz:
        return real
    with np.load(npz) as z:
        real_tmax = z["tmax"]
    settings = ctx.settings
    thresholds = (settings.tmax_hypoperfusion_s, settings.tmax_severe_s)
    comparison = compare(synthetic_tmax, real_tmax, brain, synthetic, real.get("measures") or {}, thresholds)
    model_name = str(model.get("model_name") or ctx.options.model_name)
    model_version = str(model.get("model_version") or "")
    real = {**real, "shadow": {**comparison, "model_name": model_name, "model_version": model_version}}
    if ctx.job_id is not None:
        store(settings.effective_database_url, ctx.job_id, ctx.study_uid, model_name, model_version, comparison,
              {"aif_ok": (real.get("aif") or {}).get("ok"), "warnings": real.get("warnings", [])})
    return real
