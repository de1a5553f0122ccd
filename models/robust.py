"""Robust spread shared by the core rule, the DSC baseline and the confidence: one MAD, one place."""

from __future__ import annotations

import numpy as np

MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its SD


def robust_sd(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """The median absolute deviation from the median, scaled to a normal SD: outliers (a lesion, a
    vessel, the bolus) move it little. Along ``axis`` an array, otherwise a float."""
    v = np.asarray(values)
    med = np.median(v, axis=axis, keepdims=axis is not None)
    mad = np.median(np.abs(v - med), axis=axis)
    return MAD_TO_SD * mad if axis is not None else float(MAD_TO_SD * mad)
