"""Infarct core from ADC and DWI: a transparent rule by default, a learned MONAI network optionally.

The rule is the clinical convention (RAPID, DEFUSE-3): ADC < 620e-6 mm^2/s. Taken alone on a real
ADC map that threshold also fires on noise, on the choroid plexus and ventricle walls, and on
susceptibility pile-up at the skull base, so a voxel is core only when it is also

* inside the brain mask, with finite, positive ADC and DWI,
* DWI-bright relative to *normal-appearing* brain nearby (a smooth local reference computed from
  parenchyma with normal ADC, so acute lesions and CSF do not pull the reference), with hysteresis:
  a region grows over voxels 2 noise-sigmas bright and must contain a voxel 4 sigmas bright, sigma
  being the scan's own spread of that ratio in normal parenchyma,
* in a connected component of at least ``min_component_ml``,
* not a thin rim on the ventricles (deep CSF), not lying (almost) wholly on the brain edge (more
  strictly at the skull base), and not one of a mirror-symmetric left/right pair (susceptibility
  artefacts from the petrous bones and sinuses are bilateral; infarcts almost never are).

Chronic infarcts and white-matter hyperintensities have *raised* ADC (T2 shine-through makes them
DWI-bright), so the ADC criterion keeps them out; the DWI criterion keeps low-ADC, DWI-dark voxels
(noise, fit failures, partial volume) out.

**What is reported (issue 15).** The threshold alone under-counts every core: a voxel on the lesion's
boundary holds lesion and normal tissue, its ADC is their mix and often lies above 620 although most
of the voxel is infarct. With the thick slices of stroke DWI that boundary is a large share of a small
core (the independent phantom generator measured cores 39 -> 21 mL and 4.4 -> 2.1 mL). So the reported
core is the rule above (ADC < 620 decides *which* lesions are core) plus a partial-volume step: a voxel
touching a confident core (median ADC at least 10 % below the threshold) joins it when it is estimated
to be at least half lesion, from its ADC between the local normal ADC and the core's own, and its DWI
brightness between normal and the core's own (relative evidence, independent of scanner gain). The
step reaches at most two voxels beyond the thresholded core and never starts a lesion of its own. The
core stage records both volumes (``core_ml`` and ``strict_adc620_ml``); ``CoreParams(pv_iterations=0)``
reports the strict voxelwise convention alone.

Arrays are numpy in (z, y, x) order with spacing in mm (z, y, x). The optional ``direction`` is the
SimpleITK direction matrix (LPS, columns = world direction of the x, y, z index axes); the default,
identity, is the usual axial DICOM grid (x to patient left, y to posterior, z to superior).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi

from common.errors import InvalidInputError, ModelError
from models.confidence import adc_noise
from models.robust import robust_sd

log = logging.getLogger(__name__)

# ADC units: name -> factor that converts a value in that unit to 1e-6 mm^2/s.
ADC_UNITS: dict[str, float] = {"1e-6 mm2/s": 1.0, "1e-3 mm2/s": 1e3, "mm2/s": 1e6}
# Median ADC of brain tissue (parenchyma + some CSF) in 1e-6 mm^2/s lies well inside this range
# (white matter ~700, grey ~850, CSF ~3000). A median that maps into it under exactly one unit is
# taken as that unit.
_PLAUSIBLE_MEDIAN = (300.0, 2500.0)

# The network architectures a learned core model may name (no arbitrary imports from a config).
_ARCHITECTURES = ("UNet", "BasicUNet", "SegResNet", "AttentionUnet")


@dataclass(frozen=True)
class CoreParams:
    """Thresholds of the core rule and the optional learned model.

    adc_threshold is in 1e-6 mm^2/s. dwi_ratio_min is DWI over the local normal-appearing reference.
    """

    adc_threshold: float = 620.0
    min_component_ml: float = 0.1
    # DWI brightness, as DWI over the local normal-appearing reference, is judged against the noise
    # of that ratio in normal parenchyma (sigma, robust): a region grows where the ratio exceeds
    # 1 + grow_sigmas * sigma and must hold a seed voxel above 1 + seed_sigmas * sigma (hysteresis),
    # each clipped to [floor, cap] so a very clean or very noisy scan stays within sane bounds.
    dwi_ratio_min: float = 1.1  # floor of the grow level
    dwi_ratio_grow_cap: float = 1.3
    grow_sigmas: float = 2.0
    dwi_ratio_seed: float = 1.2  # floor of the seed level
    dwi_ratio_seed_cap: float = 1.6
    seed_sigmas: float = 4.0
    csf_adc: float = 1500.0  # ADC above this (1e-6 mm^2/s) is treated as CSF-like
    reference_sigma_mm: float = 20.0  # width of the local normal-appearing DWI reference
    adc_median_px: int = 1  # in-plane median filter of ADC against speckle; 1 = off
    # Noise support (issue 15): a voxel below the ADC threshold counts as low only when at least
    # low_support of its 8 in-plane neighbours are below it too; 0 turns it off. Noise makes isolated
    # low voxels that 26-connectivity chains into clusters (at DWI b0 SNR 14 a healthy phantom brain
    # got an 8 mL core of noise); an infarct, even a punctate one, is low in neighbouring voxels.
    # The noisier the ADC, the more often normal tissue crosses the threshold, so the support rises
    # with the ADC's measured noise (models.confidence.adc_noise, 1e-6 mm^2/s): one more neighbour
    # above each level of noisy_support_above. Below the first level (every case the phantom draws
    # but a few, and the real ISLES'22 scan at 120) the support stays at low_support.
    low_support: int = 2
    noisy_support_above: tuple[float, ...] = (150.0, 200.0)
    ventricle_depth_mm: float = 15.0  # CSF deeper than this below the brain surface = ventricles
    rim_fraction_max: float = 0.6  # components mostly touching ventricular CSF are rims, dropped
    skull_base_fraction: float = 0.3  # inferior part of the brain where edge artefacts are screened
    edge_mm: float = 5.0
    edge_fraction_max: float = 0.5  # at the skull base: components mostly on the brain edge dropped
    rim_edge_fraction_max: float = 0.85  # elsewhere: only components almost wholly on the edge
    symmetric_overlap_min: float = 0.3  # a component mirrored onto another one this much = bilateral artefact
    # Partial volume (issue 15): the voxels on a core's boundary hold lesion and normal tissue, so their
    # ADC lies between the two and often above 620 although most of the voxel is infarct. A voxel
    # touching a core found by the rule joins it when its estimated lesion fraction - the mean of the
    # ADC fraction (local normal ADC - ADC) / (local normal ADC - the core's median ADC) and the DWI
    # fraction (ratio - 1) / (the core's median ratio - 1) - is at least pv_fraction_min, and each of
    # the two is at least pv_each_min. Repeated pv_iterations times; 0 turns it off.
    # Only cores whose median ADC lies at least pv_seed_margin (a fraction of the threshold) below it grow.
    pv_iterations: int = 2
    pv_fraction_min: float = 0.5
    pv_each_min: float = 0.2
    pv_seed_margin: float = 0.1
    learned_weights: Path | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.adc_threshold > 0:
            raise ValueError(f"adc_threshold must be > 0 (1e-6 mm^2/s), got {self.adc_threshold}")
        if self.min_component_ml < 0:
            raise ValueError(f"min_component_ml must be >= 0, got {self.min_component_ml}")
        if not self.dwi_ratio_min > 0:
            raise ValueError(f"dwi_ratio_min must be > 0, got {self.dwi_ratio_min}")
        if self.dwi_ratio_seed < self.dwi_ratio_min:
            raise ValueError(f"dwi_ratio_seed ({self.dwi_ratio_seed}) must be >= dwi_ratio_min ({self.dwi_ratio_min})")
        if self.dwi_ratio_grow_cap < self.dwi_ratio_min or self.dwi_ratio_seed_cap < self.dwi_ratio_seed:
            raise ValueError("dwi_ratio_grow_cap / dwi_ratio_seed_cap must be >= their floors")
        if self.csf_adc <= self.adc_threshold:
            raise ValueError(f"csf_adc ({self.csf_adc}) must exceed adc_threshold ({self.adc_threshold})")
        if not 0 <= self.low_support <= 8 - len(self.noisy_support_above):
            raise ValueError(f"low_support must lie in 0..8 (of the 8 in-plane neighbours) with room for one more "
                             f"per noisy_support_above level, got {self.low_support}")
        levels = list(self.noisy_support_above)
        if any(v <= 0 for v in levels) or levels != sorted(set(levels)):
            raise ValueError(f"noisy_support_above must be positive and rising, got {self.noisy_support_above}")
        if self.adc_median_px < 1:
            raise ValueError(f"adc_median_px must be >= 1, got {self.adc_median_px}")
        if not 0 <= self.pv_iterations <= 5:
            raise ValueError(f"pv_iterations must lie in 0..5, got {self.pv_iterations}")
        if not 0 < self.pv_fraction_min <= 1 or not 0 <= self.pv_each_min <= self.pv_fraction_min:
            raise ValueError(f"pv_fraction_min must lie in (0, 1] and pv_each_min in [0, pv_fraction_min], got "
                             f"{self.pv_fraction_min} and {self.pv_each_min}")
        if not 0 <= self.pv_seed_margin < 1:
            raise ValueError(f"pv_seed_margin must lie in [0, 1), got {self.pv_seed_margin}")
        for name in ("rim_fraction_max", "skull_base_fraction", "edge_fraction_max", "rim_edge_fraction_max"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")

    @classmethod
    def from_settings(cls, settings: Any) -> CoreParams:
        """Core parameters from common.config.Settings (adc_core_threshold, core_min_component_ml, ...)."""
        weights = getattr(settings, "core_model_weights", None)
        return cls(
            adc_threshold=float(settings.adc_core_threshold),
            min_component_ml=float(settings.core_min_component_ml),
            learned_weights=Path(weights) if weights else None,
            device=str(getattr(settings, "device", "auto")),
        )


@dataclass
class CoreResult:
    """The core mask and how it was made. adc_scale converts the input ADC to 1e-6 mm^2/s."""

    mask: np.ndarray
    adc_scale: float
    adc_units: str
    units_guessed: bool
    warnings: list[str] = field(default_factory=list)
    method: Literal["rule", "learned"] = "rule"
    partial_volume_voxels: int = 0  # voxels the partial-volume step added to the thresholded core

    def volume_ml(self, spacing_zyx: tuple[float, float, float]) -> float:
        return float(self.mask.sum()) * float(np.prod(spacing_zyx)) / 1000.0

    def strict_volume_ml(self, spacing_zyx: tuple[float, float, float]) -> float:
        """The core without the partial-volume step: the voxelwise ADC < threshold convention."""
        return float(self.mask.sum() - self.partial_volume_voxels) * float(np.prod(spacing_zyx)) / 1000.0


# ----------------------------------------------------------------------------------------- geometry


def _direction_matrix(direction: Any | None) -> np.ndarray:
    if direction is None:
        return np.eye(3)
    d = np.asarray(direction, dtype=float)
    if d.size != 9:
        raise ValueError(f"direction must hold 9 values (SimpleITK 3x3 direction), got {d.size}")
    return d.reshape(3, 3)


def world_axis(direction: Any | None, lps_axis: int) -> tuple[int, int]:
    """Which array axis (z, y, x order) runs along LPS world axis ``lps_axis`` (0=L, 1=P, 2=S).

    Returns (array_axis, sign): sign +1 when a rising index moves toward patient Left / Posterior /
    Superior. Oblique grids take the index axis closest to that world axis.
    """
    d = _direction_matrix(direction)
    comp = d[lps_axis, :]  # component of each index axis (i, j, k) along the world axis
    idx = int(np.argmax(np.abs(comp)))
    return 2 - idx, (1 if comp[idx] >= 0 else -1)


def _check_inputs(adc: np.ndarray, dwi: np.ndarray, brain: np.ndarray, spacing_zyx: Any) -> tuple[float, ...]:
    for name, arr in (("adc", adc), ("dwi", dwi), ("brain", brain)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 3:
            raise InvalidInputError(f"{name} must be a 3-D numpy array in (z, y, x) order")
    if adc.shape != dwi.shape or adc.shape != brain.shape:
        raise InvalidInputError(
            f"adc {adc.shape}, dwi {dwi.shape} and brain {brain.shape} must share one grid; "
            "resample them onto the DWI grid first"
        )
    sp = tuple(float(s) for s in spacing_zyx)
    if len(sp) != 3 or not all(s > 0 and np.isfinite(s) for s in sp):
        raise InvalidInputError(f"spacing_zyx must be three positive mm values, got {spacing_zyx!r}")
    return sp


# --------------------------------------------------------------------------------------------- units


def detect_adc_units(
    adc: np.ndarray, brain: np.ndarray, declared: str | None = None
) -> tuple[float, str, bool, list[str]]:
    """Find the factor to 1e-6 mm^2/s. Returns (scale, units, guessed, warnings).

    With ``declared`` units (from a header) they are used and only checked against the values;
    without, the units are inferred from the median in the brain and reported as guessed.
    """
    warnings: list[str] = []
    vals = adc[brain & np.isfinite(adc) & (adc > 0)]
    if vals.size == 0:
        raise InvalidInputError("ADC has no positive values inside the brain mask; check the ADC series")
    med = float(np.median(vals))
    fits = [u for u, f in ADC_UNITS.items() if _PLAUSIBLE_MEDIAN[0] <= med * f <= _PLAUSIBLE_MEDIAN[1]]
    if declared is not None:
        if declared not in ADC_UNITS:
            raise InvalidInputError(f"unknown ADC units {declared!r}; use one of {sorted(ADC_UNITS)}")
        if declared not in fits:
            warnings.append(
                f"ADC declared in {declared} but its brain median {med:.4g} is implausible in those units"
                + (f"; values look like {fits[0]}" if fits else "")
            )
        return ADC_UNITS[declared], declared, False, warnings
    if len(fits) == 1:
        units = fits[0]
        warnings.append(f"ADC units not given; guessed {units} from the brain median {med:.4g}")
    else:
        # No unit (or, impossibly, several) puts the median in range: nearest on a log scale.
        centre = np.sqrt(_PLAUSIBLE_MEDIAN[0] * _PLAUSIBLE_MEDIAN[1])
        units = min(ADC_UNITS, key=lambda u: abs(np.log(med * ADC_UNITS[u] / centre)))
        warnings.append(
            f"ADC units unclear: brain median {med:.4g} fits no expected range; assumed {units}. "
            "Check that the ADC series is a real ADC map (not a trace-weighted or exponential image)"
        )
    return ADC_UNITS[units], units, True, warnings


# ---------------------------------------------------------------------------------------------- rule


def _local_reference(dwi: np.ndarray, normal: np.ndarray, spacing: tuple[float, ...], sigma_mm: float) -> np.ndarray:
    """Smooth mean DWI of normal-appearing parenchyma around each voxel (normalised convolution).

    Absorbs the slow coil/EPI intensity gradient while ignoring lesion and CSF voxels.
    """
    sig = [sigma_mm / s for s in spacing]
    w = ndi.gaussian_filter(normal.astype(np.float32), sig, mode="constant")
    num = ndi.gaussian_filter(np.where(normal, dwi, 0).astype(np.float32), sig, mode="constant")
    glob = float(np.median(dwi[normal])) if normal.any() else float(np.median(dwi[dwi > 0]))
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = num / w
    # Where almost no normal tissue is nearby, fall back to the global value.
    weak = w < 0.05 * float(w.max()) if w.max() > 0 else np.ones_like(w, dtype=bool)
    ref[weak] = glob
    return ref


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndi.label(mask, structure=np.ones((3, 3, 3), dtype=bool))


def _drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    if min_voxels <= 1 or not mask.any():
        return mask
    lab, n = _components(mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def _hysteresis(grow: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Components of ``grow`` that contain at least one seed voxel."""
    if not seeds.any():
        return np.zeros_like(grow)
    lab, n = _components(grow)
    hit = np.zeros(n + 1, bool)
    hit[np.unique(lab[seeds])] = True
    hit[0] = False
    return hit[lab]


def _supported(low: np.ndarray, min_neighbours: int) -> np.ndarray:
    """The voxels of ``low`` with at least ``min_neighbours`` of their 8 in-plane neighbours in it too."""
    if min_neighbours <= 0 or not low.any():
        return low
    ring = np.ones((1, 3, 3), np.int16)
    ring[0, 1, 1] = 0
    return low & (ndi.convolve(low.astype(np.int16), ring, mode="constant") >= min_neighbours)


def _inplane_ball(spacing: tuple[float, ...], radius_mm: float) -> np.ndarray:
    ry, rx = (max(1, int(round(radius_mm / s))) for s in spacing[1:])
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    disk = (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2 <= radius_mm**2 + 1e-6
    return disk[None]


def segment_core_rule(
    adc_u: np.ndarray,
    dwi: np.ndarray,
    brain: np.ndarray,
    spacing: tuple[float, ...],
    params: CoreParams,
    direction: Any | None = None,
) -> tuple[np.ndarray, list[str]]:
    """The ADC/DWI rule on ADC already in 1e-6 mm^2/s. Returns (mask, warnings)."""
    mask, warnings, _ = _rule(adc_u, dwi, brain, spacing, params, direction)
    return mask, warnings


def _rule(
    adc_u: np.ndarray,
    dwi: np.ndarray,
    brain: np.ndarray,
    spacing: tuple[float, ...],
    params: CoreParams,
    direction: Any | None,
) -> tuple[np.ndarray, list[str], int]:
    """The rule, and how many voxels its partial-volume step added."""
    warnings: list[str] = []
    valid = brain & np.isfinite(adc_u) & np.isfinite(dwi) & (adc_u > 0) & (dwi > 0)
    if not valid.any():
        return np.zeros(brain.shape, bool), ["no valid ADC/DWI voxels inside the brain mask"], 0
    adc_f = adc_u
    if params.adc_median_px > 1:
        k = params.adc_median_px
        # Median only over valid voxels' neighbourhood values; outside-brain zeros are replaced by
        # CSF-like values so the filter does not pull edge voxels below threshold.
        filled = np.where(valid, adc_u, params.csf_adc * 2).astype(np.float32)
        adc_f = ndi.median_filter(filled, size=(1, k, k))
    csf = valid & (adc_u > params.csf_adc)
    support = params.low_support
    if params.low_support > 0 and params.noisy_support_above:
        noise = adc_noise(adc_u, brain)
        support += sum(noise > level for level in params.noisy_support_above)
        if support > params.low_support:
            warnings.append(f"ADC noise SD {noise:.0f} x 10^-6 mm2/s: a low-ADC voxel needs {support} of its 8 "
                            "in-plane neighbours low too (noise support raised); lesions a voxel or two wide "
                            "may be missed")
    low = _supported(valid & (adc_f < params.adc_threshold), support)
    normal = valid & ~csf & ~low
    if normal.sum() < 100:
        warnings.append("too little normal-appearing brain to reference DWI brightness; result unreliable")
    ref = _local_reference(dwi, normal, spacing, params.reference_sigma_mm)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(ref > 0, dwi / ref, 0.0)
    sigma = robust_sd(ratio[normal]) if normal.any() else 0.1
    grow_level = float(np.clip(1 + params.grow_sigmas * sigma, params.dwi_ratio_min, params.dwi_ratio_grow_cap))
    seed_level = float(np.clip(1 + params.seed_sigmas * sigma, params.dwi_ratio_seed, params.dwi_ratio_seed_cap))
    seed_level = max(seed_level, grow_level)
    grow = low & (ratio >= grow_level)
    seeds = grow & (ratio >= seed_level) & (adc_u < params.adc_threshold)
    cand = _hysteresis(grow, seeds)

    # Fill pinholes slice by slice: a core voxel whose ADC noise crossed the threshold.
    if cand.any():
        filled = np.zeros_like(cand)
        for z in np.flatnonzero(cand.any(axis=(1, 2))):
            filled[z] = ndi.binary_fill_holes(cand[z])
        cand = filled & valid & (adc_f < params.csf_adc)

    # Small components go first so that noise specks cannot pair up with a lesion as "symmetric".
    voxel_ml = float(np.prod(spacing)) / 1000.0
    cand = _drop_small(cand, params.min_component_ml / voxel_ml)
    if cand.any():
        cand = _drop_artefacts(cand, valid, csf, brain, spacing, params, direction, warnings)
    added = 0
    if cand.any() and params.pv_iterations > 0:
        grown = _grow_partial_volume(cand, adc_u, ratio, valid & ~csf, normal, spacing, params)
        added = int(grown.sum() - cand.sum())
        cand = grown
    return cand, warnings, added


def _grow_partial_volume(
    core: np.ndarray,
    adc_u: np.ndarray,
    ratio: np.ndarray,
    allowed: np.ndarray,
    normal: np.ndarray,
    spacing: tuple[float, ...],
    params: CoreParams,
) -> np.ndarray:
    """Add the boundary voxels that are mostly lesion by ADC and DWI together (see CoreParams.pv_*).

    Only voxels touching a core the strict rule found can join, so no new lesion appears and the
    artefact screens above still decide which lesions exist. The lesion's own ADC and DWI ratio (the
    medians of the strict core) and the local normal-appearing ADC are the two ends of the mixture,
    which makes the estimate relative: it does not depend on the scanner's DWI gain or on how far a
    generator's or a patient's lesion ADC lies below 620.
    """
    # Confident seeds: components whose median ADC lies clearly below the threshold. A component
    # that only just crossed it (noise at a stricter threshold, tissue at the edge of the convention)
    # does not grow, so the threshold still decides which tissue is core.
    lab, n = _components(core)
    med = np.asarray(ndi.median(adc_u, lab, np.arange(1, n + 1)), dtype=float).reshape(-1)
    confident = np.concatenate([[False], med <= (1.0 - params.pv_seed_margin) * params.adc_threshold])
    seeds = confident[lab]
    if not seeds.any():
        return core
    core_adc = float(np.median(adc_u[seeds]))
    core_ratio = float(np.median(ratio[seeds]))
    adc_ref = _local_reference(adc_u, normal, spacing, params.reference_sigma_mm)
    with np.errstate(invalid="ignore", divide="ignore"):
        f_adc = (adc_ref - adc_u) / np.maximum(adc_ref - core_adc, 50.0)
        f_dwi = (ratio - 1.0) / max(core_ratio - 1.0, 0.05)
    ok = (allowed & np.isfinite(f_adc) & np.isfinite(f_dwi) & (f_adc >= params.pv_each_min)
          & (f_dwi >= params.pv_each_min) & (0.5 * (f_adc + f_dwi) >= params.pv_fraction_min))
    struct = ndi.generate_binary_structure(3, 1)
    grown = seeds.copy()
    for _ in range(params.pv_iterations):
        add = ndi.binary_dilation(grown, struct) & ok & ~grown
        if not add.any():
            break
        grown |= add
    return core | grown


def _drop_artefacts(
    cand: np.ndarray,
    valid: np.ndarray,
    csf: np.ndarray,
    brain: np.ndarray,
    spacing: tuple[float, ...],
    params: CoreParams,
    direction: Any | None,
    warnings: list[str],
) -> np.ndarray:
    """Remove ventricle-wall rims and skull-base edge artefacts, component by component."""
    # Depth below the brain surface, in mm, in-plane distances weighted by spacing.
    depth = ndi.distance_transform_edt(brain, sampling=spacing)
    ventricles = csf & (depth > params.ventricle_depth_mm)
    near_vent = ndi.binary_dilation(ventricles, structure=_inplane_ball(spacing, 1.01 * max(spacing[1:])))
    edge = brain & (depth <= params.edge_mm)

    sup_axis, sup_sign = world_axis(direction, 2)
    coords = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != sup_axis)))
    lo, hi = (coords.min(), coords.max()) if coords.size else (0, 0)
    extent = hi - lo + 1
    n_base = int(np.ceil(params.skull_base_fraction * extent))
    base_slices = np.zeros(brain.shape[sup_axis], bool)
    if sup_sign > 0:
        base_slices[lo : lo + n_base] = True
    else:
        base_slices[hi - n_base + 1 : hi + 1] = True

    lab, n = _components(cand)
    keep = np.ones(n + 1, bool)
    keep[0] = False
    objs = ndi.find_objects(lab)
    n_rim = n_edge = 0
    n_sym = _drop_symmetric_pairs(lab, n, keep, brain, direction, params.symmetric_overlap_min)
    for i, sl in enumerate(objs, start=1):
        comp = lab[sl] == i
        size = comp.sum()
        if ventricles.any() and near_vent[sl][comp].mean() > params.rim_fraction_max:
            keep[i] = False
            n_rim += 1
            continue
        centre = int(round(ndi.center_of_mass(comp)[sup_axis] + sl[sup_axis].start))
        limit = params.edge_fraction_max if base_slices[centre] else params.rim_edge_fraction_max
        if edge[sl][comp].sum() > limit * size:
            keep[i] = False
            n_edge += 1
    if n_rim:
        warnings.append(f"{n_rim} low-ADC rim(s) along the ventricles ignored as artefact")
    if n_sym:
        warnings.append(f"{n_sym} mirror-symmetric low-ADC region(s) in both hemispheres ignored as artefact")
    if n_edge:
        warnings.append(f"{n_edge} low-ADC region(s) on the brain edge (susceptibility) ignored as artefact")
    return keep[lab]


def _drop_symmetric_pairs(
    lab: np.ndarray, n: int, keep: np.ndarray, brain: np.ndarray, direction: Any | None, min_overlap: float
) -> int:
    """Mark as dropped the components that are mirror images of another one across the midline.

    Susceptibility artefacts (petrous bone, sinuses) and coil artefacts come in left-right pairs;
    an infarct almost never has a mirror twin. A component is dropped when at least ``min_overlap`` of
    its *own* voxels, mirrored, land on another component: both halves of an artefact pair go, but a
    large infarct whose mirror image happens to cover a noise speck on the other side stays (the speck
    goes). Measuring the overlap against the smaller of the two, as this did until 2026-12-06, dropped
    a 55 mL core with a 9-voxel speck at its mirror position (randomised phantom seed 270013).
    Midline = the brain's centroid.
    """
    if n < 2 or min_overlap >= 1.0:
        return 0
    lr, _ = world_axis(direction, 0)
    profile = brain.sum(axis=tuple(a for a in range(3) if a != lr)).astype(float)
    mid = float((profile * np.arange(profile.size)).sum() / profile.sum())
    idx = np.nonzero(lab)
    labels = lab[idx]
    mirrored = list(idx)
    mirrored[lr] = np.rint(2 * mid - idx[lr]).astype(np.intp)
    ok = (mirrored[lr] >= 0) & (mirrored[lr] < lab.shape[lr])
    # Dilate the target by one voxel: a mirror image is never exact to the voxel.
    grown = ndi.grey_dilation(lab, size=(1, 3, 3))
    hits = grown[tuple(m[ok] for m in mirrored)]
    src = labels[ok]
    sizes = np.bincount(labels, minlength=n + 1)
    cross = (hits > 0) & (hits != src)  # mirrored onto a different component
    onto_other = np.bincount(src[cross], minlength=n + 1)
    twin = keep & (onto_other >= min_overlap * np.maximum(sizes, 1))
    twin[0] = False
    keep[twin] = False
    return int(twin.sum())


# ------------------------------------------------------------------------------------------- learned


def _pick_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_core_model(weights: Path, device: str = "auto") -> tuple[Any, dict[str, Any]]:
    """Build the network named in ``<weights>.json`` and load ``weights`` (safetensors) into it.

    Config keys: architecture (one of UNet, BasicUNet, SegResNet, AttentionUnet), network (its
    keyword arguments), output ("sigmoid" or "softmax"), threshold, optional size_divisor,
    roi_size (sliding window, z y x), weights_sha256. Raises ModelError with what to fix.
    """
    weights = Path(weights)
    cfg_path = weights.with_suffix(".json")
    if not weights.is_file():
        raise ModelError(f"core model weights {weights} not found; fix core_model_weights or leave it empty")
    if not cfg_path.is_file():
        raise ModelError(f"core model config {cfg_path} not found; it must sit beside the weights")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"core model config {cfg_path} is not valid JSON: {exc}") from exc
    arch = cfg.get("architecture")
    if arch not in _ARCHITECTURES:
        raise ModelError(f"core model architecture {arch!r} is not supported; use one of {_ARCHITECTURES}")
    if cfg.get("output", "sigmoid") not in ("sigmoid", "softmax"):
        raise ModelError("core model config 'output' must be 'sigmoid' or 'softmax'")
    expected = cfg.get("weights_sha256")
    if expected:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != expected:
            raise ModelError(f"core model weights {weights} do not match weights_sha256 in its config")
    import monai.networks.nets as nets
    from safetensors.torch import load_file

    try:
        net = getattr(nets, arch)(**cfg.get("network", {}))
        state = load_file(str(weights))
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # any construction/shape error is a model problem to report
        raise ModelError(f"core model {weights} could not be loaded: {exc}") from exc
    net.eval().to(_pick_device(device))
    return net, cfg


def _learned_inputs(adc_u: np.ndarray, dwi: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Two channels: ADC in 1e-3 mm^2/s and DWI over the brain median (zero outside the brain)."""
    ok = brain & np.isfinite(adc_u) & np.isfinite(dwi)
    med = float(np.median(dwi[ok & (dwi > 0)])) if (ok & (dwi > 0)).any() else 1.0
    a = np.where(ok, adc_u / 1000.0, 0.0)
    d = np.where(ok, dwi / med, 0.0)
    return np.stack([a, d]).astype(np.float32)


def segment_core_learned(
    net: Any, cfg: dict[str, Any], adc_u: np.ndarray, dwi: np.ndarray, brain: np.ndarray
) -> np.ndarray:
    """Run the network (3-D whole volume, 3-D sliding window, or 2-D slice by slice) -> bool mask."""
    import torch

    x = torch.from_numpy(_learned_inputs(adc_u, dwi, brain))
    device = next(net.parameters()).device
    dims = int(cfg.get("network", {}).get("spatial_dims", 3))
    div = int(cfg.get("size_divisor", 16))
    with torch.inference_mode():
        if dims == 2:
            batch = x.permute(1, 0, 2, 3)  # (z, C, y, x)
            out = torch.cat([_run_padded(net, batch[i : i + 16].to(device), div) for i in range(0, len(batch), 16)])
            logits = out.permute(1, 0, 2, 3)  # (C, z, y, x)
        elif cfg.get("roi_size"):
            from monai.inferers import sliding_window_inference

            logits = sliding_window_inference(
                x[None].to(device), roi_size=tuple(cfg["roi_size"]), sw_batch_size=1, predictor=net, overlap=0.25
            )[0]
        else:
            logits = _run_padded(net, x[None].to(device), div)[0]
    logits = logits.float().cpu()
    if cfg.get("output", "sigmoid") == "softmax":
        prob = torch.softmax(logits, dim=0)[1]
    else:
        prob = torch.sigmoid(logits[0])
    return (prob.numpy() >= float(cfg.get("threshold", 0.5))) & brain


def _run_padded(net: Any, x: Any, div: int) -> Any:
    import torch.nn.functional as F

    spatial = x.shape[2:]
    pads: list[int] = []
    for s in reversed(spatial):
        pads += [0, (-s) % div]
    y = net(F.pad(x, pads) if any(pads) else x)
    return y[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]


# -------------------------------------------------------------------------------------------- entry


def segment_core(
    adc: np.ndarray,
    dwi: np.ndarray,
    brain: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    params: CoreParams | None = None,
    *,
    adc_units: str | None = None,
    direction: Any | None = None,
) -> CoreResult:
    """Infarct core mask on the DWI grid.

    ``adc_units`` ("1e-6 mm2/s", "1e-3 mm2/s" or "mm2/s") when a header says so; otherwise inferred
    and flagged as guessed. When ``params.learned_weights`` is set the learned network replaces the
    rule; if it cannot be loaded or run, the rule is used and a warning says why.
    """
    params = params or CoreParams()
    spacing = _check_inputs(adc, dwi, brain, spacing_zyx)
    brain = brain.astype(bool)
    adc = np.asarray(adc, dtype=np.float32)
    dwi = np.asarray(dwi, dtype=np.float32)
    scale, units, guessed, warnings = detect_adc_units(adc, brain, adc_units)
    adc_u = adc * np.float32(scale)

    if params.learned_weights is not None:
        try:
            net, cfg = load_core_model(params.learned_weights, params.device)
            mask = segment_core_learned(net, cfg, adc_u, dwi, brain)
            voxel_ml = float(np.prod(spacing)) / 1000.0
            mask = _drop_small(mask, params.min_component_ml / voxel_ml)
            return CoreResult(mask, scale, units, guessed, warnings, "learned")
        except Exception as exc:  # noqa: BLE001 - any model failure falls back to the rule
            log.warning("learned core model failed, using the ADC rule: %s", exc)
            warnings.append(f"learned core model not used ({exc}); fell back to the ADC rule")

    mask, rule_warnings, added = _rule(adc_u, dwi, brain, spacing, params, direction)
    return CoreResult(mask, scale, units, guessed, warnings + rule_warnings, "rule", added)
