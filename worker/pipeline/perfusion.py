"""Real perfusion from a DSC-PWI series: load it, put it on the DWI grid, compute the maps.

The numerics live in ``models.perfusion`` (pure arrays); this module does the DICOM side: it groups
the DSC frames by time point (classic one-file-per-image and enhanced multi-frame alike), builds one
volume per time point, resamples onto the DWI grid when the DSC was planned differently, takes the
frame interval from RepetitionTime (2D EPI DSC acquires one volume per TR) and the echo time from
the header, and decides the hemispheres (patient left/right from the LPS x of each voxel against the
brain's midline) and the AIF search region (the lower-middle brain, where the MCA runs).

The maps are research output ("DSC-derived"); each check that fails (truncated bolus, motion, a poor
AIF) is a warning on the job, never a silent map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from common.dicomio.frames import FrameInfo
from common.dicomio.geometry import cluster_positions, normal_of
from common.dicomio.pixels import PixelCache
from common.dicomio.volume import build_volume
from common.errors import InvalidInputError
from models.perfusion import DscOptions, DscResult, compute_maps
from worker.pipeline.load import resample_to, same_grid
from worker.pipeline.measure import compute_measures

MAP_NAMES = ("tmax", "cbf", "cbv", "mtt", "ttp", "rcbf", "rcbv", "rmtt")
#: AIF candidates: brain voxels between these fractions of the brain's inferior-superior extent
AIF_BAND = (0.1, 0.6)


@dataclass
class DscSeries:
    """A DSC series on the DWI grid: (t, z, y, x) signal, frame times (s) and echo time (s)."""

    signal: np.ndarray
    times_s: np.ndarray
    te_s: float
    warnings: list[str] = field(default_factory=list)


def _repetition_time_ms(path: Path) -> float | None:
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    if "RepetitionTime" in ds and ds.RepetitionTime not in (None, ""):
        return float(ds.RepetitionTime)
    for group in (ds.get("SharedFunctionalGroupsSequence") or []):
        for item in (group.get("MRTimingAndRelatedParametersSequence") or []):
            if item.get("RepetitionTime") not in (None, ""):
                return float(item.RepetitionTime)
    return None


def group_time_points(frames: list[FrameInfo]) -> list[list[FrameInfo]]:
    """Frames grouped into time points: each slice position's frames in time order, then transposed."""
    fr = [f for f in frames if f.position is not None and f.orientation is not None]
    if not fr:
        raise InvalidInputError("DSC: no frames with a position in space")
    n = normal_of(fr[0].orientation)  # type: ignore[arg-type]
    groups = cluster_positions([float(np.asarray(f.position) @ n) for f in fr])
    counts = {len(g) for g in groups}
    if len(counts) != 1:
        raise InvalidInputError(f"DSC: uneven number of time points per slice ({sorted(counts)}); incomplete series")
    key = lambda f: (f.temporal_index or 0, f.acquisition_number or 0, f.instance_number or 0, f.frame or 0)  # noqa: E731
    per_slice = [sorted((fr[i] for i in g), key=key) for g in groups]
    return [[s[t] for s in per_slice] for t in range(counts.pop())]


def load_dsc(frames: list[FrameInfo], dwi: sitk.Image) -> DscSeries:
    """The DSC series as (t, z, y, x) float32 on the DWI grid."""
    points = group_time_points(frames)
    if len(points) < 20:
        raise InvalidInputError(f"DSC: only {len(points)} time points; at least 20 are needed for deconvolution")
    warnings: list[str] = []
    tr_ms = _repetition_time_ms(points[0][0].path)
    if tr_ms is None or not 300.0 <= tr_ms <= 5000.0:
        raise InvalidInputError(f"DSC: RepetitionTime {tr_ms} ms is missing or not a DSC frame interval (300-5000 ms)")
    te = points[0][0].echo_time
    if te is None or not 5.0 <= te <= 120.0:
        raise InvalidInputError(f"DSC: EchoTime {te} ms is missing or implausible for gradient-echo DSC")
    cache = PixelCache()
    vols = []
    resampled = False
    for t, pts in enumerate(points):
        img = build_volume(pts, f"DSC t={t + 1}", "single", cache).image
        if not same_grid(img, dwi):
            img = resample_to(img, dwi)
            resampled = True
        vols.append(sitk.GetArrayFromImage(img).astype(np.float32))
    if resampled:
        warnings.append("DSC planned on another grid than the DWI; resampled onto the DWI grid (linear)")
    times = np.arange(len(vols), dtype=np.float64) * tr_ms / 1000.0
    return DscSeries(signal=np.stack(vols), times_s=times, te_s=float(te) / 1000.0, warnings=warnings)


def _world(dwi: sitk.Image) -> np.ndarray:
    """LPS x and z (mm) of every voxel centre, shape (2, z, y, x)."""
    nx, ny, nz = dwi.GetSize()
    sp = np.asarray(dwi.GetSpacing())
    d = np.asarray(dwi.GetDirection()).reshape(3, 3)
    o = np.asarray(dwi.GetOrigin())
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    pts = o[:, None, None, None] + np.einsum("ab,bzyx->azyx", d * sp[None, :], np.stack([i, j, k]).astype(np.float64))
    return pts[[0, 2]]


def hemispheres_and_band(dwi: sitk.Image, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hemisphere labels (1 patient right, 2 patient left, 0 within 2 mm of the midline) and the AIF band."""
    x, z = _world(dwi)
    mid = float(np.median(x[brain]))
    hemi = np.where(x > mid + 2.0, 2, np.where(x < mid - 2.0, 1, 0)).astype(np.int8)
    lo, hi = np.quantile(z[brain], AIF_BAND)
    return hemi, brain & (z >= lo) & (z <= hi)


def dsc_maps(frames: list[FrameInfo], dwi: sitk.Image, brain: np.ndarray, core: np.ndarray | None = None,
             options: DscOptions | None = None) -> tuple[DscResult, DscSeries]:
    """Load the DSC series and compute the maps on the DWI grid (arrays (z, y, x) like ``brain``)."""
    series = load_dsc(frames, dwi)
    brain = np.asarray(brain, bool)
    covered = brain & (series.signal[: max(3, series.signal.shape[0] // 10)].mean(axis=0) > 0)
    if covered.sum() < 0.5 * brain.sum():
        series.warnings.append(f"DSC covers {covered.sum() / max(brain.sum(), 1):.0%} of the brain")
    hemi, band = hemispheres_and_band(dwi, covered)
    sp = dwi.GetSpacing()
    res = compute_maps(series.signal, series.times_s, series.te_s, covered, spacing_zyx=(sp[2], sp[1], sp[0]),
                       core=core, hemisphere=hemi, aif_region=band, options=options)
    res.warnings[:0] = series.warnings
    return res, series


def real_measures(res: DscResult, brain: np.ndarray, core: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    """The synthetic map's measures (volumes, mismatch, DEFUSE-3/EXTEND, side) for the real Tmax,
    computed by the same rules (worker.pipeline.measure) so the two can be compared field by field."""
    m = compute_measures(core, np.nan_to_num(res.maps["tmax"], nan=0.0), brain, voxel_ml).to_dict()
    return {"source": "DSC-derived (research)", **m}


def write_maps(res: DscResult, dwi: sitk.Image, out_dir: Path) -> dict[str, str]:
    """perfusion.npz (all maps and the AIF) and one NIfTI per map in ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in res.maps.items() if k in MAP_NAMES}
    npz = out_dir / "perfusion.npz"
    np.savez_compressed(npz, aif=res.aif.curve, aif_voxels=res.aif.voxels, **arrays)
    paths = {"npz": str(npz)}
    for name, arr in arrays.items():
        img = sitk.GetImageFromArray(np.nan_to_num(arr, nan=0.0).astype(np.float32))
        img.CopyInformation(dwi)
        p = out_dir / f"dsc_{name}.nii.gz"
        sitk.WriteImage(img, str(p))
        paths[name] = str(p)
    return paths


def perfusion_for_job(selection: Any, dwi: np.ndarray, brain: np.ndarray, core: np.ndarray, origin: Any,
                      spacing_xyz: Any, direction: Any, out_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The pipeline's optional DSC step: None without a DSC series; else the result.json entry
    (real measures, AIF quality and curve, checks, output paths) and the warnings for the job.

    A DSC that cannot be used (unreadable, too short, no AIF) gives a warning and no maps; it never
    fails the job, whose synthetic results do not depend on it.
    """
    dsc = getattr(selection, "dsc", None)
    if dsc is None:
        return None, []
    img = sitk.GetImageFromArray(np.asarray(dwi, np.float32))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing_xyz))
    img.SetDirection(tuple(float(v) for v in direction))
    try:
        res, series = dsc_maps(dsc.frames, img, np.asarray(brain, bool), np.asarray(core, bool))
    except (InvalidInputError, ValueError) as exc:
        return {"source": "DSC-derived (research)", "error": str(exc)}, [f"DSC not used: {exc}"]
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    entry = {"measures": real_measures(res, np.asarray(brain, bool), np.asarray(core, bool), voxel_ml),
             "aif": {**res.aif.quality, "curve_delta_r2s_per_s": [round(float(v), 4) for v in res.aif.curve]},
             "checks": {k: res.quality[k] for k in ("bolus", "motion", "late_peak_fraction")},
             "method": {"deconvolution": res.quality["method"], "oi_threshold": res.quality["oi_threshold"],
                        "tmax": res.quality.get("tmax_method"),
                        "dt_s": res.dt, "te_s": series.te_s, "n_frames": int(series.signal.shape[0])},
             "series_uid": dsc.series_uid, "warnings": list(res.warnings),
             "outputs": write_maps(res, img, out_dir)}
    return entry, [f"DSC: {w}" for w in res.warnings]
