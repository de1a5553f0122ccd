"""The numbers a stroke team decides with: volumes, mismatch, HIR, DEFUSE-3 / EXTEND, side, DWI-FLAIR.

Conventions (written out because vendors differ):

* Volumes count voxels inside the brain mask times ``voxel_ml`` (mL = cm^3). Tmax > 6 s and
  Tmax > 10 s are strict inequalities; non-finite Tmax counts as not hypoperfused.
* Mismatch volume = vol(Tmax > 6 s) - vol(core), the volume *difference* as RAPID reports it (not
  the volume of the set Tmax>6 minus core). When the core exceeds the hypoperfusion it is reported
  as 0 mL, not negative. Mismatch ratio = vol(Tmax > 6 s) / vol(core); undefined (None) when the
  core is 0 mL -- never a division by zero. A zero core with hypoperfusion satisfies the ratio
  criteria of DEFUSE-3 and EXTEND (the ratio is unbounded), as in the trials' software.
* HIR = vol(Tmax > 10 s) / vol(Tmax > 6 s); None when there is no Tmax > 6 s.
* Side: the hemisphere that holds the larger part of the core (of the Tmax > 6 s region when the
  core is empty), relative to the brain's centroid along the patient left-right axis. The axis and
  its sense come from ``direction`` (SimpleITK direction, LPS; identity = axial grid whose x index
  runs to patient *left*, which a radiological display shows on the image *right*).
* DWI-FLAIR mismatch: median FLAIR in the core over median FLAIR in the core mirrored across the
  midline (brain voxels only, core voxels excluded); medians, so bright sulcal vessels (FVH) and
  CSF partial volume at the lesion's edge do not tip it. A ratio below ``flair_mismatch_ratio_max``
  (default 1.15) means the lesion is not yet FLAIR-bright: the WAKE-UP trial's sign of an onset
  likely within 4.5 h. It is an indicator only, reported with the word "indicator" downstream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from common.errors import InvalidInputError
from worker.pipeline.core import world_axis


@dataclass(frozen=True)
class MeasureThresholds:
    """Every threshold of the measures; defaults are the trial values, settings override them."""

    tmax_hypoperfusion_s: float = 6.0
    tmax_severe_s: float = 10.0
    defuse3_core_max_ml: float = 70.0
    defuse3_ratio_min: float = 1.8
    defuse3_mismatch_min_ml: float = 15.0
    extend_core_max_ml: float = 70.0
    extend_ratio_min: float = 1.2
    extend_mismatch_min_ml: float = 10.0
    flair_mismatch_ratio_max: float = 1.15

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite value >= 0, got {value}")
        if self.tmax_severe_s < self.tmax_hypoperfusion_s:
            raise ValueError(
                f"tmax_severe_s ({self.tmax_severe_s}) must be >= tmax_hypoperfusion_s ({self.tmax_hypoperfusion_s})"
            )

    @classmethod
    def from_settings(cls, settings: Any) -> MeasureThresholds:
        """All thresholds from common.config.Settings (tmax_*, defuse3_*, extend_*, flair_*)."""
        values = {name: float(getattr(settings, name)) for name in cls.__dataclass_fields__ if hasattr(settings, name)}
        return cls(**values)


@dataclass(frozen=True)
class Measures:
    core_ml: float
    tmax6_ml: float
    tmax10_ml: float
    mismatch_ml: float
    mismatch_ratio: float | None
    hir: float | None
    defuse3: bool
    extend: bool
    side: Literal["left", "right", "none"]
    flair_ratio: float | None
    dwi_flair_mismatch: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, arr: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 3:
        raise InvalidInputError(f"{name} must be a 3-D array in (z, y, x) order, got {a.ndim}-D")
    if shape is not None and a.shape != shape:
        raise InvalidInputError(f"{name} has shape {a.shape}, expected {shape} (the core/DWI grid)")
    return a


def compute_measures(
    core: np.ndarray,
    tmax: np.ndarray,
    brain: np.ndarray,
    voxel_ml: float,
    thresholds: MeasureThresholds | None = None,
    flair: np.ndarray | None = None,
    spacing_zyx: tuple[float, float, float] | None = None,
    *,
    direction: Any | None = None,
) -> Measures:
    """Measures from a core mask and a Tmax map (s) on one grid. See the module docstring."""
    t = thresholds or MeasureThresholds()
    core_a = _check("core", core, None).astype(bool)
    shape = core_a.shape
    tmax_a = _check("tmax", tmax, shape).astype(np.float32)
    brain_a = _check("brain", brain, shape).astype(bool)
    if not (np.isfinite(voxel_ml) and voxel_ml > 0):
        raise InvalidInputError(f"voxel_ml must be a positive volume in mL, got {voxel_ml}")
    if spacing_zyx is not None:
        from_spacing = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
        if abs(from_spacing - voxel_ml) > 1e-3 * voxel_ml:
            raise InvalidInputError(
                f"voxel_ml {voxel_ml} disagrees with spacing_zyx {tuple(spacing_zyx)} ({from_spacing} mL)"
            )

    core_in = core_a & brain_a
    finite = np.isfinite(tmax_a)
    hypo = brain_a & finite & (tmax_a > t.tmax_hypoperfusion_s)
    severe = brain_a & finite & (tmax_a > t.tmax_severe_s)
    core_ml = float(core_in.sum()) * voxel_ml
    tmax6_ml = float(hypo.sum()) * voxel_ml
    tmax10_ml = float(severe.sum()) * voxel_ml

    mismatch_ml = max(tmax6_ml - core_ml, 0.0)
    ratio = tmax6_ml / core_ml if core_ml > 0 else None
    hir = tmax10_ml / tmax6_ml if tmax6_ml > 0 else None

    def ratio_at_least(minimum: float, strict: bool) -> bool:
        if ratio is None:  # zero core: unbounded ratio when there is any hypoperfusion
            return tmax6_ml > 0
        return ratio > minimum if strict else ratio >= minimum

    defuse3 = (
        core_ml < t.defuse3_core_max_ml
        and ratio_at_least(t.defuse3_ratio_min, strict=False)
        and mismatch_ml >= t.defuse3_mismatch_min_ml
    )
    extend = (
        core_ml < t.extend_core_max_ml
        and ratio_at_least(t.extend_ratio_min, strict=True)
        and mismatch_ml > t.extend_mismatch_min_ml
    )

    lr_axis, lr_sign = world_axis(direction, 0)
    midline = _midline(brain_a, lr_axis)
    side = _side(core_in if core_in.any() else hypo, lr_axis, lr_sign, midline)

    flair_ratio: float | None = None
    if flair is not None and core_in.any() and midline is not None:
        flair_a = _check("flair", flair, shape).astype(np.float32)
        flair_ratio = _flair_ratio(flair_a, core_in, brain_a, lr_axis, midline)
    wake_up = None if flair_ratio is None else bool(flair_ratio < t.flair_mismatch_ratio_max)

    return Measures(
        core_ml=core_ml,
        tmax6_ml=tmax6_ml,
        tmax10_ml=tmax10_ml,
        mismatch_ml=mismatch_ml,
        mismatch_ratio=ratio,
        hir=hir,
        defuse3=bool(defuse3),
        extend=bool(extend),
        side=side,
        flair_ratio=flair_ratio,
        dwi_flair_mismatch=wake_up,
    )


def _midline(brain: np.ndarray, lr_axis: int) -> float | None:
    """Index (along the left-right array axis) of the brain's centroid: the mirror plane."""
    if not brain.any():
        return None
    profile = brain.sum(axis=tuple(a for a in range(3) if a != lr_axis)).astype(float)
    return float((profile * np.arange(profile.size)).sum() / profile.sum())


def _side(region: np.ndarray, lr_axis: int, lr_sign: int, midline: float | None) -> Literal["left", "right", "none"]:
    if midline is None or not region.any():
        return "none"
    profile = region.sum(axis=tuple(a for a in range(3) if a != lr_axis)).astype(float)
    pos = np.arange(profile.size) - midline
    towards_left = profile[pos * lr_sign > 0].sum()
    towards_right = profile[pos * lr_sign < 0].sum()
    if towards_left == towards_right:
        return "none"
    return "left" if towards_left > towards_right else "right"


def _flair_ratio(
    flair: np.ndarray, core: np.ndarray, brain: np.ndarray, lr_axis: int, midline: float
) -> float | None:
    idx = np.nonzero(core)
    mirrored = list(idx)
    mirrored[lr_axis] = np.rint(2 * midline - idx[lr_axis]).astype(np.intp)
    inside = (mirrored[lr_axis] >= 0) & (mirrored[lr_axis] < core.shape[lr_axis])
    mirrored = [m[inside] for m in mirrored]
    mirror = np.zeros_like(core)
    mirror[tuple(mirrored)] = True
    mirror &= brain & ~core & np.isfinite(flair)
    ok_core = core & np.isfinite(flair)
    if not mirror.any() or not ok_core.any():
        return None
    reference = float(np.median(flair[mirror]))
    if reference <= 0:
        return None
    return float(np.median(flair[ok_core])) / reference
