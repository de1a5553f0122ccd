"""Per-study confidence in the pipeline: compute it (models.confidence) and withhold the trial calls
of a low-confidence study.

A low-confidence study still gets every map, volume and the SEG: a reader can look at them. What it
does not get is a DEFUSE-3 or EXTEND call - the one-word answer a stroke team acts on - because the
score says the synthetic Tmax behind that word is not to be trusted. ``measures["defuse3"]`` and
``measures["extend"]`` become None (rendered "withheld (low confidence)" on the summary page, left
out of the SR's mismatch-profile evaluations, shown as "low confidence" on the dashboard), and
``measures["confidence"]`` says why. The calls are not kept anywhere in the job's result, so nothing
downstream can show them by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common.errors import ModelError
from worker.pipeline.core import world_axis

#: what the summary page, the SR and the dashboard say in place of a withheld call
WITHHELD = "withheld (low confidence)"


def study_confidence(
    tmax: np.ndarray, sd: np.ndarray, core: np.ndarray, brain: np.ndarray, spacing_zyx: tuple[float, float, float], *,
    dwi: np.ndarray, flair: np.ndarray | None, adc: np.ndarray | None, model_source: str | None,
    registration: Mapping[str, Any] | None, direction: Any | None, diffusion: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The confidence record of one study (JSON-ready): score, low, threshold, parts, reasons, missing."""
    from models.confidence import assess, load_reference

    try:
        reference = load_reference(model_source)
    except (ValueError, OSError) as exc:
        raise ModelError(f"the model's input reference could not be read: {exc}") from exc
    lr_axis, _ = world_axis(direction, 0)
    conf = assess(tmax, sd, core, brain, spacing_zyx, dwi=dwi, flair=flair, adc=adc, reference=reference,
                  registration=registration, diffusion=diffusion, lr_axis=lr_axis)
    out = conf.to_dict()
    out["score"] = round(float(out["score"]), 4)
    keep = ("tmax6_ml", "far_from_core_ml", "unsupported_ml", "fvh_sign", "symmetric_share", "sd_at_call_s",
            "core_covered_share", "input_distance", "adc_noise")
    out["details"] = {k: out["details"][k] for k in keep if k in out["details"]}
    return out


def apply_confidence(measures: Mapping[str, Any], confidence: Mapping[str, Any]) -> dict[str, Any]:
    """The measures with the confidence record attached and, when it is low, no DEFUSE-3/EXTEND call."""
    out = dict(measures)
    out["confidence"] = dict(confidence)
    if confidence.get("low"):
        out["defuse3"] = None
        out["extend"] = None
        out["calls_withheld"] = WITHHELD
    return out
