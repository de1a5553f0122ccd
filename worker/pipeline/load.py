"""Selected series -> SimpleITK volumes on the DWI grid, FLAIR registered, brain mask, ADC.

Public interface (used by the worker's core/synthesize/encode stages):

- :func:`load_study(selection, *, register=True)` -> :class:`LoadedStudy`
- :func:`register_rigid(fixed, moving, ...)` -> (transform, info dict)
- :func:`brain_mask(b0)` -> uint8 SimpleITK mask
- :func:`compute_adc(b0, dwi, b)` -> ADC in 1e-6 mm^2/s

Intensity normalisation for the model is NOT done here (models/ owns it): volumes keep scanner units,
except ADC which is always returned in 1e-6 mm^2/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from common.dicomio.pixels import PixelCache
from common.dicomio.volume import SliceRef, Volume, build_volume
from common.errors import InvalidInputError
from models.confidence import diffusion_part
from worker.pipeline.classify import Selection

ADC_MAX = 5000.0  # 1e-6 mm^2/s; free water at 37 C is ~3000


@dataclass
class LoadedStudy:
    """Volumes on the DWI (high b) grid and where each slice came from.

    ``dwi`` high-b (trace or geometric mean over directions), ``b0``, ``adc`` (1e-6 mm^2/s; computed as
    ln(S0/S)/b when no ADC series came: ``adc_computed``), ``flair`` (rigidly registered and resampled
    onto the DWI grid), ``brain`` (uint8 0/1). ``sources[role]`` lists, per slice of that role's own
    volume in slice order, a :class:`SliceRef` (file path, 0-based frame for multi-frame, SOP Instance
    UID, position, all contributing frames). ``sources["dwi"]`` matches the DWI grid slice for slice and
    is what the encoder references; ``sources["flair"]`` is in the FLAIR's own (pre-registration) order;
    ``sources["b0"]`` / ``sources["adc"]`` exist only when those series arrived (not when computed).
    ``registration`` holds metric_before/metric_after (Mattes MI, lower is better), the Euler3D
    parameters, rotation_deg, translation_mm and the 4x4 matrix mapping DWI points to FLAIR points.
    """

    dwi: sitk.Image
    b0: sitk.Image
    adc: sitk.Image
    flair: sitk.Image
    brain: sitk.Image
    registration: dict[str, Any]
    warnings: list[str]
    sources: dict[str, list[SliceRef]]
    b_high: float
    adc_computed: bool
    b0_computed: bool = False
    dwi_directions: int = 0  # diffusion directions combined into ``dwi``; 0 = the scanner's trace
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def dwi_sources(self) -> list[SliceRef]:
        return self.sources["dwi"]


# ---------------------------------------------------------------------------------- grid helpers
def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-2)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def resample_to(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
                interpolator: int = sitk.sitkLinear) -> sitk.Image:
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)


# ------------------------------------------------------------------------------------------ ADC
def compute_adc(b0: sitk.Image, dwi: sitk.Image, b_value: float, mask: sitk.Image | None = None) -> sitk.Image:
    """ADC = ln(S0/S)/b in 1e-6 mm^2/s, clipped to [0, ADC_MAX]; 0 outside ``mask`` / where S0 ~ 0."""
    s0 = sitk.GetArrayViewFromImage(b0).astype(np.float64)
    s = sitk.GetArrayViewFromImage(dwi).astype(np.float64)
    floor = max(1e-3, 0.01 * float(np.percentile(s0, 99)))
    valid = (s0 > floor) & (s > 0)
    adc = np.zeros_like(s0)
    adc[valid] = np.log(s0[valid] / s[valid]) / b_value * 1e6
    adc = np.clip(adc, 0.0, ADC_MAX)
    if mask is not None:
        adc *= sitk.GetArrayViewFromImage(mask) > 0
    out = sitk.GetImageFromArray(adc.astype(np.float32))
    out.CopyInformation(dwi)
    return out


def adc_to_micro(adc: sitk.Image, mask: sitk.Image | None, warnings: list[str]) -> sitk.Image:
    """Bring a scanner ADC map to 1e-6 mm^2/s: detect 1e-3 or mm^2/s storage from the brain median."""
    arr = sitk.GetArrayFromImage(adc).astype(np.float32)
    sel = arr[(sitk.GetArrayViewFromImage(mask) > 0) & (arr > 0)] if mask is not None else arr[arr > 0]
    if sel.size == 0:
        return adc
    med = float(np.median(sel))
    factor = 1.0
    if 1e-4 <= med < 0.01:
        factor = 1e6
    elif 0.01 <= med < 10:
        factor = 1e3
    elif med >= 10000:
        factor = 1e-3  # stored in 1e-9 mm^2/s
    if factor != 1.0:
        warnings.append(f"ADC series median {med:.4g} in brain: rescaled by {factor:g} to 1e-6 mm^2/s")
        arr *= factor
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(adc)
    return out


# ------------------------------------------------------------------------------------ brain mask
def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


# tissue bridges narrower than twice this (in-plane) are cut between brain and scalp
BRAIN_OPENING_MM = 7.0


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (yy ** 2 + xx ** 2 <= radius * radius)[None]


def brain_mask(b0: sitk.Image) -> sitk.Image:
    """Brain mask from the b0 (T2-weighted, bright brain and CSF, dark background and skull).

    Median filter (noise), Otsu threshold on the non-background range (background is over half the
    voxels, so Otsu splits background from tissue, not tissue classes). A bright scalp is tissue by
    that threshold too, joined to the brain through partial-volume skull; taking the largest
    component and filling its holes then took the whole head (on 96 randomised phantom cases 9 masks
    were over 1.3x the brain, up to 1.94x; a phantom study with a 10 mm bright scalp came out at 2.3x,
    and the synthetic and DSC Tmax maps called "hypoperfusion" in the scalp). So the tissue is opened by
    a disk of BRAIN_OPENING_MM in-plane, which cuts those bridges; the component holding most of the
    head's deep core (the inner half of the in-plane distance to the head's edge) is the brain; it is
    dilated back by the same disk inside the tissue, closed, and its holes filled per slice. Measured on
    the same 96: over 1.3x in 1 case (1.63x), mean Dice with the true brain 0.931 -> 0.946, true brain
    missed 0.1 % on average (1.4 % at most); unrandomised cases unchanged (Dice 0.984).
    """
    img = sitk.Cast(b0, sitk.sitkFloat32)
    img = sitk.Median(img, [1, 1, 0])
    arr = sitk.GetArrayFromImage(img)
    hi = float(np.percentile(arr, 99.5))
    vals = np.clip(arr[arr > 0], 0, hi) if np.any(arr > 0) else arr.ravel()
    tissue = arr > _otsu(vals)
    head = np.stack([ndimage.binary_fill_holes(sl) for sl in tissue])
    sx, sy = (float(v) for v in b0.GetSpacing()[:2])
    depth = np.stack([ndimage.distance_transform_edt(sl, sampling=(sy, sx)) for sl in head])
    deep = head & (depth >= 0.5 * depth.max()) if depth.max() > 0 else head
    disk = _disk(max(1, int(round(BRAIN_OPENING_MM / sx))))
    eroded = ndimage.binary_erosion(tissue, disk)
    labels, n = ndimage.label(eroded)
    if n == 0:  # nothing survives the opening (a thin slab, a tiny head): the plain largest component
        labels, n = ndimage.label(tissue)
        sizes = ndimage.sum(tissue, labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
        brain = labels == (1 + int(np.argmax(sizes))) if n else tissue
    else:
        hits = ndimage.sum(deep, labels, index=np.arange(1, n + 1))
        brain = ndimage.binary_dilation(labels == (1 + int(np.argmax(hits))), disk) & tissue
    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask.CopyInformation(b0)
    mask = sitk.BinaryMorphologicalClosing(mask, [3, 3, 1])
    arr_m = sitk.GetArrayFromImage(mask).astype(bool)
    filled = np.stack([ndimage.binary_fill_holes(sl) for sl in arr_m]).astype(np.uint8)
    out = sitk.GetImageFromArray(filled)
    out.CopyInformation(b0)
    return out


# ---------------------------------------------------------------------------------- registration
def _rotation_angle_deg(matrix: np.ndarray) -> float:
    return float(np.degrees(math.acos(max(-1.0, min(1.0, (np.trace(matrix) - 1.0) / 2.0)))))


def _metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, mask: sitk.Image | None,
            bins: int, sampling: float = 0.25, seed: int = 1) -> float:
    """Mattes MI at ``transform`` on a fixed random subset of fixed-image voxels (same seed, same
    points for 'before' and 'after', so the two values are comparable)."""
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(sampling, seed)
    r.SetInterpolator(sitk.sitkLinear)
    if mask is not None:
        r.SetMetricFixedMask(mask)
    r.SetInitialTransform(transform, inPlace=False)
    return float(r.MetricEvaluate(fixed, moving))


def overlap_fraction(fixed: sitk.Image, moving: sitk.Image, stride: int = 4) -> float:
    """Fraction of fixed-image voxel centres (sub-sampled) that fall inside the moving image's volume."""
    size = np.array(fixed.GetSize())
    axes = [np.arange(0, n, stride if n > stride else 1) for n in size]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).astype(float)

    def index_to_world(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
        m = np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
        return m, np.asarray(img.GetOrigin())

    fm, fo = index_to_world(fixed)
    mm, mo = index_to_world(moving)
    pts = idx @ fm.T + fo
    cont = (pts - mo) @ np.linalg.inv(mm).T
    msize = np.array(moving.GetSize())
    inside = np.all((cont >= -0.5) & (cont <= msize - 0.5), axis=1)
    return float(inside.mean())


def match_resolution(moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    """Downsample ``moving`` in-plane (own orientation, Gaussian anti-aliasing) to about the fixed
    image's in-plane spacing when it is more than 1.5x finer: the metric only ever samples it at the
    fixed resolution, and a 4x smaller image is cheaper to smooth, shrink and interpolate."""
    fs = min(fixed.GetSpacing()[:2])
    ms = moving.GetSpacing()
    ratio = fs / max(ms[:2])
    if ratio < 1.5:
        return moving
    factor = max(2, int(round(ratio)))
    sigma = 0.5 * factor * max(ms[:2])
    smooth = sitk.DiscreteGaussian(moving, [sigma**2, sigma**2, 0.0], 32, 0.01, True)
    size = [max(1, moving.GetSize()[0] // factor), max(1, moving.GetSize()[1] // factor), moving.GetSize()[2]]
    spacing = [ms[0] * factor, ms[1] * factor, ms[2]]
    d = np.asarray(moving.GetDirection()).reshape(3, 3)
    # keep the physical centre of the first voxel block: new voxel (0,0) covers old voxels 0..factor-1
    origin = np.asarray(moving.GetOrigin()) + d @ np.array([(factor - 1) * ms[0] / 2, (factor - 1) * ms[1] / 2, 0.0])
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, tuple(origin), spacing,
                         moving.GetDirection(), 0.0, sitk.sitkFloat32)


def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None = None,
    shrink: tuple[int, ...] = (4, 2, 1),
    smoothing: tuple[float, ...] = (2.0, 1.0, 0.0),
    iterations: int = 100,
    sampling: float = 0.2,
    bins: int = 50,
    seed: int = 0,
) -> tuple[sitk.Euler3DTransform, dict[str, Any]]:
    """Rigid (Euler3D) Mattes-MI registration of ``moving`` onto ``fixed``, multi-resolution.

    The returned transform maps fixed (DWI) physical points to moving (FLAIR) points, i.e. resample
    the FLAIR with it onto the DWI grid. Initialisation is the scanner geometry (identity); the centre
    of rotation is the fixed image centre. ``shrink=(1,)`` and ``smoothing=(0,)`` give the
    single-resolution baseline used in the benchmark. ``fixed_mask`` restricts the metric to a region;
    the pipeline does not use it: on the phantom a brain-only MI let the optimiser drift (the whole
    head with its background edge is the better-conditioned target). Defaults (50 bins, 20 % random
    samples, shrink 4/2/1) recover phantom motion to ~0.5 mm / 0.4 degrees.
    """
    if len(shrink) != len(smoothing):
        raise ValueError(f"shrink {shrink} and smoothing {smoothing} need one entry per level")
    t0 = time.perf_counter()
    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = match_resolution(sitk.Cast(moving, sitk.sitkFloat32), f)
    size = np.array(f.GetSize())
    centre = f.TransformContinuousIndexToPhysicalPoint(tuple(float(x) for x in (size - 1) / 2.0))
    init = sitk.Euler3DTransform()
    init.SetCenter(centre)
    before = _metric(f, m, init, fixed_mask, bins)
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(sampling, seed)
    if fixed_mask is not None:
        r.SetMetricFixedMask(fixed_mask)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.5,
    )
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel(list(shrink))
    r.SetSmoothingSigmasPerLevel(list(smoothing))
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    final = sitk.Euler3DTransform(init)
    r.SetInitialTransform(final, inPlace=True)
    r.Execute(f, m)
    after = _metric(f, m, final, fixed_mask, bins)
    kept = after > before
    if kept:
        # The optimum found is worse than where we started (images already aligned, sampling noise):
        # never return a worse alignment than the scanner geometry by our own measure.
        final, after = sitk.Euler3DTransform(init), before
    rot = np.asarray(final.GetMatrix()).reshape(3, 3)
    trans = np.asarray(final.GetTranslation())
    c = np.asarray(final.GetCenter())
    m44 = np.eye(4)
    m44[:3, :3] = rot
    m44[:3, 3] = c + trans - rot @ c
    info = {
        "method": "Euler3D rigid, Mattes MI",
        "levels": {"shrink": list(shrink), "smoothing_vox": list(smoothing)},
        "metric": "MattesMutualInformation (negative; lower is better)",
        "metric_before": before,
        "metric_after": after,
        "improved": after < before,
        "kept_scanner_geometry": kept,
        "angles_rad_xyz": [final.GetAngleX(), final.GetAngleY(), final.GetAngleZ()],
        "translation_param_mm": trans.tolist(),
        "center_lps": c.tolist(),
        "rotation_deg": _rotation_angle_deg(rot),
        "translation_mm": float(np.linalg.norm(trans)),
        "matrix_dwi_to_flair": m44.tolist(),
        "iterations_last_level": int(r.GetOptimizerIteration()),
        "stop": r.GetOptimizerStopConditionDescription(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return final, info


# ------------------------------------------------------------------------------------- the stage
def diffusion_directions(slices: Sequence[SliceRef], trace: bool) -> int:
    """How many diffusion directions the high-b DWI combines; 0 for a trace or when no frame says.

    Counted on the middle slice's frames as distinct gradient directions (g and -g are one direction).
    Frames without a gradient are most often a trace the classifier did not recognise, so they count as
    0, not 1. The ADC < 620 core convention needs an isotropic ADC: from one or two directions,
    white-matter tracts across the gradient fall below 620 on a healthy brain (measured on the Philips
    DTI in ../shared/realdata, docs/benchmarks.md).
    """
    if trace or not slices:
        return 0
    dirs: set[tuple[float, ...]] = set()
    for f in slices[len(slices) // 2].contributors:
        g = np.asarray(f.gradient if f.gradient is not None else (0.0, 0.0, 0.0), float)
        n = float(np.linalg.norm(g))
        if n < 1e-6:
            continue
        g = g / n
        if g[np.flatnonzero(np.abs(g) > 1e-6)[0]] < 0:
            g = -g
        dirs.add(tuple(float(v) for v in np.round(g, 2)))
    return len(dirs)


def _vol(frames, what: str, combine, cache: PixelCache) -> Volume:
    if not frames:
        raise InvalidInputError(f"{what}: no images selected")
    return build_volume(frames, what, combine, cache)


def load_study(selection: Selection, *, register: bool = True, seed: int = 0,
               registration_options: dict[str, Any] | None = None) -> LoadedStudy:
    """Build every input volume on the DWI grid (see :class:`LoadedStudy`).

    ``registration_options`` are passed to :func:`register_rigid` (the benchmark uses them for its
    single-resolution baseline); ``register=False`` keeps the scanner geometry.

    Raises :class:`common.errors.InvalidInputError` for unusable geometry or pixel data.
    """
    t = {"start": time.perf_counter()}
    warnings = list(selection.warnings)
    cache = PixelCache()
    b = selection.b_high
    label = f"DWI b={b:g}"
    dwi_v = _vol(selection.high_b_frames(), label, "mean" if selection.dwi.is_trace else "geomean", cache)
    warnings += dwi_v.warnings
    dwi = dwi_v.image
    sources: dict[str, list[SliceRef]] = {"dwi": dwi_v.slices}
    b0_computed = False
    b0: sitk.Image | None = None
    if selection.b0 is not None:
        b0_v = _vol(selection.b0_frames(), "DWI b=0", "mean", cache)
        warnings += b0_v.warnings
        sources["b0"] = b0_v.slices
        b0 = b0_v.image
        if not same_grid(b0, dwi):
            warnings.append("b0 and high-b DWI are on different grids; b0 resampled onto the DWI grid")
            b0 = resample_to(b0, dwi)
    t["dwi"] = time.perf_counter()
    adc: sitk.Image | None = None
    if selection.adc is not None:
        adc_v = _vol(selection.adc.frames, "ADC", "mean", cache)
        warnings += adc_v.warnings
        sources["adc"] = adc_v.slices
        adc = adc_v.image
        if not same_grid(adc, dwi):
            warnings.append("ADC and DWI are on different grids; ADC resampled onto the DWI grid")
            adc = resample_to(adc, dwi)
    if b0 is None:
        assert adc is not None  # select_inputs guarantees b0 or ADC
        adc = adc_to_micro(adc, None, warnings)
        s = sitk.GetArrayViewFromImage(dwi).astype(np.float64)
        a = sitk.GetArrayViewFromImage(adc).astype(np.float64)
        arr = (s * np.exp(b * a * 1e-6)).astype(np.float32)
        b0 = sitk.GetImageFromArray(arr)
        b0.CopyInformation(dwi)
        b0_computed = True
    brain = brain_mask(b0)
    frac = float(np.mean(sitk.GetArrayViewFromImage(brain)))
    if not 0.02 <= frac <= 0.7:
        warnings.append(f"brain mask covers {frac:.0%} of the DWI volume; check that the b0 shows a head")
    t["mask"] = time.perf_counter()
    if adc is None:
        adc = compute_adc(b0, dwi, b, brain)
        adc_computed = True
    else:
        adc = adc_to_micro(adc, brain, warnings)
        adc_computed = False
    directions = diffusion_directions(dwi_v.slices, selection.dwi.is_trace)
    _, unfit = diffusion_part({"b_high": b, "dwi_directions": directions, "adc_computed": adc_computed})
    warnings += [f"{reason} (the confidence is lowered)" for reason in unfit]
    fl_v = _vol(selection.flair.frames, "FLAIR", "mean", cache)
    warnings += fl_v.warnings
    sources["flair"] = fl_v.slices
    overlap = overlap_fraction(b0, fl_v.image)
    if overlap < 0.2:
        raise InvalidInputError(
            f"FLAIR and DWI do not overlap in patient space (FLAIR covers {overlap:.0%} of the DWI volume), so "
            "the FLAIR cannot be registered to the DWI; check both series come from the same patient and "
            "study (Frame of Reference)"
        )
    if overlap < 0.6:
        warnings.append(f"FLAIR covers only {overlap:.0%} of the DWI volume; regions outside it are empty")
    if register:
        try:
            transform, reg = register_rigid(b0, fl_v.image, seed=seed, **(registration_options or {}))
        except RuntimeError as exc:
            if "overlap" not in str(exc):
                raise
            raise InvalidInputError(
                "FLAIR and DWI do not overlap in patient space, so the FLAIR cannot be registered to the "
                "DWI; check both series come from the same patient and study (Frame of Reference)"
            ) from exc
        if reg["kept_scanner_geometry"]:
            warnings.append(
                f"FLAIR registration found no better alignment than the scanner geometry (metric "
                f"{reg['metric_before']:.4f}); kept it. If the FLAIR looks shifted, check it belongs to this study"
            )
        if reg["rotation_deg"] > 15 or reg["translation_mm"] > 30:
            warnings.append(
                f"FLAIR registration moved {reg['rotation_deg']:.1f} deg / {reg['translation_mm']:.1f} mm; "
                "large motion between DWI and FLAIR"
            )
    else:
        transform, reg = sitk.Euler3DTransform(), {"method": "none (scanner geometry)"}
    reg["flair_overlap_fraction"] = round(overlap, 3)
    flair = resample_to(fl_v.image, dwi, transform)
    t["flair"] = time.perf_counter()
    timings = {
        "read_dwi_s": t["dwi"] - t["start"],
        "mask_s": t["mask"] - t["dwi"],
        "flair_register_s": t["flair"] - t["mask"],
        "total_s": t["flair"] - t["start"],
    }
    return LoadedStudy(
        dwi=dwi, b0=b0, adc=adc, flair=flair, brain=brain, registration=reg, warnings=warnings,
        sources=sources, b_high=b, adc_computed=adc_computed, b0_computed=b0_computed,
        dwi_directions=directions,
        timings_s={k: round(v, 3) for k, v in timings.items()},
    )
