"""DSC-PWI series -> Tmax, CBF, CBV, MTT, TTP and relative maps, with the checks that guard them.

Order: whole-brain bolus (baseline, arrival, truncation) -> Delta R2* -> motion check -> automatic AIF
-> in-plane smoothing of the tissue curves (not the AIF's, not large vessels') -> oSVD deconvolution
(one SVD, all voxels) -> maps. Units: CBF mL/100 g/min and CBV mL/100 g with
the customary large/small-vessel haematocrit correction ``kH = (1 - 0.45)/(1 - 0.25)`` and brain
density 1.04 g/mL; the AIF is not corrected for partial volume, so absolute CBF/CBV are nominal
and the relative maps (against the unaffected hemisphere) are the ones to compare. Tmax and MTT
are in seconds and do not depend on the AIF's scale.

CBV integrates the first pass only: the AIF's first pass ends at its first minimum after the peak
(or where it falls below 10 % of it); a tissue voxel's window ends as long after its own peak,
stretched by how much wider its curve is than the AIF's, so the recirculation is cut in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.perfusion.aif import AifResult, select_aif
from models.perfusion.deconv import DEFAULT_OI, osvd, residue_peak_time, ssvd
from models.perfusion.signal import Bolus, Motion, concentration, delta_r2s_noise, detect_bolus, motion_check
from models.perfusion.tmax_fit import fit_residue

KH = (1 - 0.45) / (1 - 0.25)
RHO = 1.04
LATE_FRACTION = 0.1  # voxels peaking in the last 10 % of frames are flagged as truncated
NO_BOLUS_CNR = 5.0  # peak Delta R2* under this many baseline noise SDs: no measurable bolus, no value
# with smoothing, a voxel's own unsmoothed curve must hold OWN_BOLUS_FRAMES consecutive frames whose mean
# reaches OWN_BOLUS_CNR noise SDs of such a mean (own_bolus)
OWN_BOLUS_FRAMES = 8
OWN_BOLUS_CNR = 4.0
VESSEL_CBV_RATIO = 5.0  # CBV over 5x the brain median: a large vessel, no Tmax
LATE_TTP_S = 3.0  # TTP this much after the brain's median: late tissue, for the affected side without a core


@dataclass
class DscOptions:
    """Method settings; the defaults are the documented method (docs/perfusion.md)."""

    oi_threshold: float = DEFAULT_OI
    method: str = "osvd"  # "osvd" or "ssvd" (baseline)
    tmax_method: str = "fit"  # "fit" (model-based, models/perfusion/tmax_fit.py) or "residue" (argmax of the oSVD residue)
    truncation_fraction: float = 0.5
    motion_threshold_mm: float = 2.0
    min_aif_candidates: int = 40
    # in-plane Gaussian smoothing of the tissue curves before deconvolution (FWHM, mm; 0 = none; 5 mm from
    # docs/perfusion.md "Spatial smoothing": 4 mm was best at 128², 6 mm at 64², 5 within 0.005 of both); the AIF
    # and the large-vessel test always use the unsmoothed curves, and vessels are kept out of the kernel
    smooth_fwhm_mm: float = 5.0

    def __post_init__(self) -> None:
        if self.method not in ("osvd", "ssvd"):
            raise ValueError(f"method must be 'osvd' or 'ssvd', got {self.method!r}")
        if self.tmax_method not in ("fit", "residue"):
            raise ValueError(f"tmax_method must be 'fit' or 'residue', got {self.tmax_method!r}")
        if not 0 < self.oi_threshold < 1:
            raise ValueError(f"oi_threshold must be in (0, 1), got {self.oi_threshold!r}")
        if not 0 <= self.smooth_fwhm_mm <= 20:
            raise ValueError(f"smooth_fwhm_mm must be 0..20 mm, got {self.smooth_fwhm_mm!r}")


@dataclass
class DscResult:
    """Maps (z, y, x) float32 (NaN outside the brain), the AIF and what the checks found."""

    maps: dict[str, np.ndarray]
    aif: AifResult
    bolus: Bolus
    motion: Motion | None
    dt: float
    warnings: list[str] = field(default_factory=list)
    quality: dict = field(default_factory=dict)
    brain: np.ndarray | None = None  # the voxels analysed; ``aif.voxels`` index its True voxels in C order

    def aif_flat_indices(self) -> np.ndarray:
        """The AIF voxels as flat (C-order) indices into the (z, y, x) maps."""
        return np.flatnonzero(self.brain)[self.aif.voxels]


def first_pass_window(curve: np.ndarray) -> tuple[int, int, int]:
    """(start, peak, end) frames of a bolus curve's first pass; end is exclusive."""
    c = np.convolve(np.asarray(curve, np.float64), np.ones(3) / 3, mode="same")
    p = int(np.argmax(c))
    top = c[p]
    start = p
    while start > 0 and c[start - 1] > 0.1 * top:
        start -= 1
    end = p + 1
    while end < c.size and c[end] > 0.1 * top and not (c[end] < c[end - 1] and c[end] <= c[min(end + 1, c.size - 1)]):
        end += 1
    return start, p, min(end + 1, c.size)


def uniform_frames(series: np.ndarray, times_s: np.ndarray) -> tuple[np.ndarray, float]:
    """The series on a uniform time grid (linear interpolation if the frame times are uneven)."""
    times = np.asarray(times_s, np.float64)
    if times.ndim != 1 or times.size != series.shape[0] or np.any(np.diff(times) <= 0):
        raise ValueError(f"times_s must increase strictly, one per frame ({series.shape[0]}), got {times.size}")
    steps = np.diff(times)
    dt = float(np.median(steps))
    if np.max(np.abs(steps - dt)) <= 0.05 * dt:
        return series, dt
    grid = times[0] + dt * np.arange(int(np.floor((times[-1] - times[0]) / dt)) + 1)
    j = np.clip(np.searchsorted(times, grid, side="right") - 1, 0, times.size - 2)
    w = ((grid - times[j]) / (times[j + 1] - times[j])).astype(np.float32)
    w = w.reshape((-1,) + (1,) * (series.ndim - 1))
    return (1 - w) * series[j] + w * series[j + 1], dt


def measurable_bolus(conc: np.ndarray, s0: np.ndarray, sd: np.ndarray, te_s: float) -> np.ndarray:
    """Voxels whose peak Delta R2* reaches NO_BOLUS_CNR baseline noise SDs (CSF and background do not)."""
    return conc.max(axis=0) >= NO_BOLUS_CNR * delta_r2s_noise(s0, sd, te_s)


def own_bolus(conc: np.ndarray, s0: np.ndarray, sd: np.ndarray, te_s: float, start: int,
              window: int = OWN_BOLUS_FRAMES) -> np.ndarray:
    """Voxels whose own (unsmoothed) curve shows a bolus: some ``window``-frame mean of Delta R2* from
    frame ``start`` on reaches OWN_BOLUS_CNR noise SDs of such a mean.

    Why a running mean and not the peak: hypoperfused tissue's bolus is only a few noise SDs per frame
    at a clinical TE (why the curves are smoothed at all), but it lasts many frames; a voxel without
    blood has no run of frames above its noise. Measured on 14 randomised studies through the b0 brain
    mask (docs/perfusion.md, "Spatial smoothing"): false Tmax > 6 s outside the true brain 0.1-20 mL ->
    0.0-2.8 mL, all-voxel Dice 0.893 -> 0.933; every voxel it removes inside the true brain on
    17 unrandomised studies is CSF, to which the phantom's truth gives a Tmax."""
    c = np.asarray(conc[start:], np.float32)
    w = int(min(window, c.shape[0]))
    if w < 1:
        return np.zeros(c.shape[1], bool)
    cs = np.cumsum(np.vstack([np.zeros((1, c.shape[1]), np.float32), c]), axis=0)
    run = (cs[w:] - cs[:-w]) / w
    return run.max(axis=0) >= OWN_BOLUS_CNR * delta_r2s_noise(s0, sd, te_s) / np.sqrt(w)


def late_hemisphere(conc: np.ndarray, hemi: np.ndarray, dt: float, s0: np.ndarray, sd: np.ndarray,
                    te_s: float) -> int | None:
    """The hemisphere label (1/2) with clearly more tissue peaking late (TTP over LATE_TTP_S after the
    brain's median, among voxels with a measurable bolus): at least twice the other side's count and 1 %
    of those voxels; None when the two sides look alike."""
    ok = measurable_bolus(conc, s0, sd, te_s) & (hemi > 0)
    if ok.sum() < 100 or conc.shape[0] < 5:
        return None
    c = conc[:, ok]
    ttp = (np.argmax(c[:-2] + c[1:-1] + c[2:], axis=0) + 1) * dt
    late = ttp > np.median(ttp) + LATE_TTP_S
    counts = [int((late & (hemi[ok] == side)).sum()) for side in (1, 2)]
    if max(counts) >= max(2 * min(counts), 0.01 * ok.sum()):
        return 1 + int(np.argmax(counts))
    return None


def _hemisphere_stat(values: np.ndarray, hemi: np.ndarray, side: int) -> float:
    v = values[(hemi == side) & np.isfinite(values)]
    return float(v.sum()) if v.size else 0.0


def smooth_in_plane(series: np.ndarray, weight: np.ndarray, fwhm_mm: float,
                    spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Each frame of ``series`` (t, z, y, x) smoothed in-plane by a Gaussian of ``fwhm_mm``, as a
    normalised convolution over the voxels where ``weight`` (z, y, x) is true: voxels outside it (large
    vessels, background) neither contribute nor get changed. Slices are not mixed (DSC slices are thick)."""
    from scipy.ndimage import gaussian_filter

    sig = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    sigma = (0.0, sig / float(spacing_zyx[1]), sig / float(spacing_zyx[2]))
    w = np.asarray(weight, np.float32)
    den = gaussian_filter(w, sigma)
    out = np.array(series, dtype=np.float32, copy=True)
    inside = (w > 0) & (den > 1e-6)
    for t in range(series.shape[0]):
        num = gaussian_filter(series[t].astype(np.float32) * w, sigma)
        out[t][inside] = num[inside] / den[inside]
    return out


def first_pass_cbv(conc: np.ndarray, aif: np.ndarray, dt: float) -> np.ndarray:
    """CBV (mL/100 g) per voxel: first-pass area of ``conc`` (t, voxels) against the AIF's (module
    docstring: each voxel's window ends as long after its peak as the AIF's, stretched by its width)."""
    a_start, a_peak, a_end = first_pass_window(aif)
    aif_area = float(np.asarray(aif, np.float64)[a_start:a_end].sum() * dt)
    cols = np.arange(conc.shape[1])
    peak_v = np.argmax(conc, axis=0)
    peak_val = conc[peak_v, cols]
    fw = (conc >= 0.5 * np.maximum(peak_val, 1e-9)[None, :]).sum(axis=0)
    fw_aif = max(int((aif >= 0.5 * np.max(aif)).sum()), 1)
    stretch = np.maximum(1.0, fw / fw_aif)
    end_v = np.clip(np.round(peak_v + (a_end - a_peak) * stretch).astype(int), 1, conc.shape[0])
    area_v = np.cumsum(conc, axis=0, dtype=np.float64)[end_v - 1, cols] * dt
    return KH / RHO * 100.0 * area_v / max(aif_area, 1e-12)


def voxel_maps(conc: np.ndarray, aif: np.ndarray, dt: float, method: str = "osvd",
               oi_threshold: float = DEFAULT_OI, tmax_method: str = "fit") -> dict[str, np.ndarray]:
    """Per-voxel Tmax, CBF, CBV, MTT, TTP (and a late-peak flag) from concentration curves
    ``conc`` (t, voxels) and the AIF (t,), both Delta R2* (1/s), frame interval ``dt`` s.

    With oSVD, ``tmax_method="fit"`` (default) takes Tmax from the model fit seeded by the oSVD
    residue's argmax (kept as ``tmax_residue``); ``"residue"`` keeps the argmax. sSVD (the baseline)
    always reports its residue's argmax."""
    if tmax_method not in ("fit", "residue"):
        raise ValueError(f"tmax_method must be 'fit' or 'residue', got {tmax_method!r}")
    if method == "osvd":
        dec = osvd(aif, conc, dt, oi_threshold)
    elif method == "ssvd":
        dec = ssvd(aif, conc, dt)
    else:
        raise ValueError(f"method must be 'osvd' or 'ssvd', got {method!r}")
    cbv = first_pass_cbv(conc, aif, dt)
    peak_v = np.argmax(conc, axis=0)
    cbf = KH / RHO * 6000.0 * dec.cbf
    with np.errstate(divide="ignore", invalid="ignore"):
        mtt = np.where(cbf > 0, 60.0 * cbv / cbf, np.nan)
    late = peak_v >= int(np.ceil((1 - LATE_FRACTION) * conc.shape[0]))
    tmax_residue = dec.tmax()
    out = {"tmax": tmax_residue, "tmax_residue": tmax_residue, "cbf": cbf.astype(np.float32),
           "cbv": cbv.astype(np.float32), "mtt": mtt.astype(np.float32),
           "ttp": residue_peak_time(conc, dt, circular=False), "late": late.astype(np.float32), "n_kept": dec.n_kept}
    if method == "osvd" and tmax_method == "fit":
        out["tmax"], flow = fit_residue(aif, conc, dt, tmax_residue)
        # the fit's amplitude as CBF: not the reported CBF (bench/perfusion.py compares the two;
        # docs/perfusion.md, "CBF")
        out["cbf_fit"] = (KH / RHO * 6000.0 * flow).astype(np.float32)
    return out


def compute_maps(series: np.ndarray, times_s: np.ndarray, te_s: float, brain: np.ndarray, *,
                 spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0), core: np.ndarray | None = None,
                 hemisphere: np.ndarray | None = None, aif_region: np.ndarray | None = None,
                 options: DscOptions | None = None) -> DscResult:
    """All maps from a (t, z, y, x) DSC series.

    ``brain`` (z, y, x) bool; ``hemisphere`` (z, y, x) labels 1/2 (0 = midline/unknown), needed for
    the relative maps and the core-side AIF preference; ``core`` (z, y, x) bool infarct core;
    ``aif_region`` (z, y, x) bool voxels allowed as AIF candidates (default: the brain).
    """
    opt = options or DscOptions()
    series = np.asarray(series)
    if series.ndim != 4:
        raise ValueError(f"series must be (t, z, y, x), got shape {series.shape}")
    shape = series.shape[1:]
    brain = np.asarray(brain, bool)
    if brain.shape != shape:
        raise ValueError(f"brain must have shape {shape}, got {brain.shape}")
    for name, arr in (("core", core), ("hemisphere", hemisphere), ("aif_region", aif_region)):
        if arr is not None and np.shape(arr) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {np.shape(arr)}")
    if not brain.any():
        raise ValueError("brain mask is empty")
    series, dt = uniform_frames(series.astype(np.float32, copy=False), times_s)
    warnings: list[str] = []

    sig = series[:, brain]  # (t, voxels)
    bolus = detect_bolus(sig.mean(axis=1), opt.truncation_fraction)
    if bolus.truncated:
        warnings.append(f"DSC truncated: the bolus does not wash out before the series ends (last frames at "
                        f"{bolus.end_fraction:.0%} of the peak); maps underestimate delay and CBV")
    if bolus.short_baseline:
        warnings.append(f"DSC baseline only {bolus.arrival - bolus.baseline_start} frame(s) before the bolus")
    motion = motion_check(series, spacing_zyx, bolus, opt.motion_threshold_mm)
    if motion.moved:
        warnings.append(f"DSC head motion up to {motion.max_mm:.1f} mm in {len(motion.frames_over)} frame(s); "
                        "maps are unreliable")

    conc, s0, sd = concentration(sig, bolus, te_s)
    hemi_v = None if hemisphere is None else np.asarray(hemisphere)[brain]
    avoid, side_from = None, None
    if core is not None and hemi_v is not None:
        core_v = np.asarray(core, bool)[brain]
        counts = [int((core_v & (hemi_v == s)).sum()) for s in (1, 2)]
        if max(counts) > 0:
            avoid, side_from = 1 + int(np.argmax(counts)), "core"
    if avoid is None and hemi_v is not None:
        # no core to say which side is affected (a TIA, an early or a small study): the side with clearly
        # more late-peaking tissue, so the AIF is not taken from arteries fed late through collaterals
        avoid = late_hemisphere(conc, hemi_v, dt, s0, sd, te_s)
        side_from = "ttp" if avoid is not None else None
    fp_end = bolus.washout + (bolus.washout - bolus.arrival) if bolus.washout is not None else conc.shape[0]
    fp = (max(bolus.arrival - 2, 0), int(min(max(fp_end, bolus.peak + 3), conc.shape[0])))
    aif = select_aif(conc, s0, sd, sig.min(axis=0), te_s, fp,
                     candidates=None if aif_region is None else np.asarray(aif_region, bool)[brain],
                     hemisphere=hemi_v, avoid_hemisphere=avoid, min_candidates=opt.min_aif_candidates, dt=dt)
    warnings += aif.warnings

    raw_cbv = None
    if opt.smooth_fwhm_mm > 0:
        # large vessels are found on the unsmoothed curves (first-pass area, as CBV) and kept out of the
        # kernel, so arterial and sinus signal is not spread into the tissue around them
        raw_cbv = first_pass_cbv(conc, aif.curve, dt).astype(np.float32)
        raw_bolus = measurable_bolus(conc, s0, sd, te_s)
        med = float(np.median(raw_cbv[raw_bolus])) if raw_bolus.any() else 0.0
        vessel_raw = raw_bolus & (raw_cbv > VESSEL_CBV_RATIO * med) if med > 0 else np.zeros_like(raw_bolus)
        weight = np.zeros(shape, bool)
        weight[brain] = ~vessel_raw
        raw_conc, raw_s0, raw_sd = conc, s0, sd
        smoothed = smooth_in_plane(series, weight, opt.smooth_fwhm_mm, spacing_zyx)
        conc, s0, sd = concentration(smoothed[:, brain], bolus, te_s)

    per = voxel_maps(conc, aif.curve, dt, opt.method, opt.oi_threshold, opt.tmax_method)
    # voxels without a measurable bolus (CSF, background inside the mask) get no value rather than
    # the argmax of noise: peak Delta R2* under 5 baseline noise SDs
    no_bolus = ~measurable_bolus(conc, s0, sd, te_s)
    if raw_cbv is not None:
        # smoothing fills a voxel inside the mask from its neighbours even where it has no blood of its
        # own (CSF, skull and marrow in the mask's rim): such a voxel gets no value either
        no_bolus |= ~own_bolus(raw_conc, raw_s0, raw_sd, te_s, bolus.arrival)
    for name in ("tmax", "cbf", "cbv", "mtt", "ttp"):
        per[name] = np.where(no_bolus, np.nan, per[name]).astype(np.float32)
    # large vessels (venous sinus, arteries in the cisterns) are not tissue: their "residue" peaks at the
    # vessel's own transit (the sinus 5-8 s after the AIF), which would read as hypoperfusion. A voxel
    # whose CBV is over VESSEL_CBV_RATIO times the brain's median holds mostly blood; its Tmax is not
    # reported (CBF/CBV/MTT stay). Tissue, even hyperaemic, stays within about 3x the median.
    cbv_for_vessels = per["cbv"] if raw_cbv is None else np.where(no_bolus, np.nan, raw_cbv)
    cbv_median = float(np.nanmedian(cbv_for_vessels)) if np.isfinite(cbv_for_vessels).any() else 0.0
    vessel = (~no_bolus & (cbv_for_vessels > VESSEL_CBV_RATIO * cbv_median) if cbv_median > 0
              else np.zeros_like(no_bolus))
    per["tmax"] = np.where(vessel, np.nan, per["tmax"]).astype(np.float32)
    tmax, cbf = per["tmax"], per["cbf"]
    late = per["late"] > 0

    def full(v: np.ndarray) -> np.ndarray:
        out = np.full(shape, np.nan, np.float32)
        out[brain] = v
        return out

    maps = {name: full(per[name]) for name in ("tmax", "cbf", "cbv", "mtt", "ttp")}
    maps["truncated_voxels"] = full(late.astype(np.float32))
    quality: dict = {"dt_s": dt, "n_frames": int(series.shape[0]), "method": opt.method,
                     "oi_threshold": opt.oi_threshold if opt.method == "osvd" else None,
                     "tmax_method": opt.tmax_method if opt.method == "osvd" else "residue",
                     "late_peak_fraction": round(float(late.mean()), 4),
                     "no_bolus_fraction": round(float(no_bolus.mean()), 4),
                     "vessel_fraction": round(float(vessel.mean()), 4), "bolus": bolus.to_dict(dt),
                     "motion": motion.to_dict(), "aif": {**aif.quality, "avoided_side_from": side_from,
                                                                 "warnings": list(aif.warnings)}}
    if late.mean() > 0.05:
        warnings.append(f"{late.mean():.0%} of brain voxels peak in the last frames: their curves are truncated")

    if hemi_v is not None:
        affected = avoid
        if affected is None:
            t6 = (np.nan_to_num(tmax) > 6.0).astype(np.float64)
            affected = 1 + int(np.argmax([_hemisphere_stat(t6, hemi_v, s) for s in (1, 2)]))
        ref = (hemi_v != affected) & (hemi_v > 0) & (tmax < 4.0) & (cbf > 0) & ~late & ~no_bolus
        quality["reference"] = {"affected_hemisphere": affected, "n_voxels": int(ref.sum())}
        if ref.sum() >= 50:
            for name in ("cbf", "cbv", "mtt"):
                vals = per[name]
                m = float(np.nanmedian(vals[ref]))
                maps["r" + name] = full(vals / m if m > 0 else np.full_like(vals, np.nan))
                quality["reference"][name + "_median"] = round(m, 4)
        else:
            warnings.append("too few normal voxels in the unaffected hemisphere for relative maps")
    return DscResult(maps=maps, aif=aif, bolus=bolus, motion=motion, dt=dt, warnings=warnings, quality=quality,
                     brain=brain)
