"""Automatic arterial input function, after Mouridsen et al. (MRM 2006;55:524).

Arterial voxels have the earliest, highest and narrowest concentration curves. From the candidate
voxels (brain, optionally a region near the middle cerebral arteries, and - when the infarct core is
known - the hemisphere without it, so the AIF is not taken downstream of the occlusion):

1. reject **saturated** curves: at the bolus peak the signal is within 3 baseline SDs of zero or
   below 5 % of S0 (-ln(S/S0) > 3), where Delta R2* no longer follows the concentration;
2. keep the curves with the highest peaks (top 5 %, at least ``min_candidates``), then drop the
   noisiest quarter (baseline noise against the peak; Mouridsen's curvature-based roughness, and a
   running-mean wiggle tried here, read the sharp arterial peak itself as irregular at a coarse TR);
3. k-means (k = 5) on the curves normalised to unit area, keep the cluster with the smallest first
   moment (earliest bolus; ties: the highest mean peak) and cluster that cluster once more;
4. reject **partial-volume** curves in the chosen cluster: those much wider (FWHM > 1.5 x the
   cluster median) or unlike its mean shape (correlation < 0.9) - tissue mixed into an arterial
   voxel delays and widens its curve;
5. the AIF is the mean of what is left. A quality record keeps the numbers and warnings.
6. if the AIF came from one hemisphere and peaks less than MIN_AIF_LEAD_S before the candidates'
   median (tissue, not artery: at a small matrix that side may hold almost no unsaturated artery),
   the search runs again over both; that AIF is kept if it passes the check, warned and marked not ok
   (it may come from the affected side, downstream of the occlusion).
7. if that is still tissue-like, the arteries are there but saturated (a long TE, a small matrix: every
   healthy-side artery voxel drops to the noise floor at the peak). Their curves keep the bolus's
   timing on the frames that are not saturated, so the earliest cluster of saturated curves is taken
   (hemisphere without the core first), each curve's saturated frames are replaced by a gamma-variate
   fitted to its unsaturated first-pass frames, and the AIF is their mean, warned and marked not ok.
   Its height is an extrapolation (CBF and CBV are nominal anyway); Tmax depends on its timing.

Venous curves (sagittal sinus) are as high as arterial ones but arrive seconds later, so the
first-moment criterion leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.optimize import curve_fit

from models.perfusion.signal import delta_r2s_noise

N_CLUSTERS = 5
# an arterial curve peaks seconds before the brain's median voxel (tissue transit and dispersion; 4 s in
# the phantom's healthy cases); a "lead" under 2 s means the AIF came from tissue (dt known)
MIN_AIF_LEAD_S = 2.0
TOP_FRACTION = 0.05


@dataclass
class AifResult:
    """The AIF curve (Delta R2*, 1/s, per frame), the chosen voxels and a quality record."""

    curve: np.ndarray
    voxels: np.ndarray  # indices into the candidate voxel axis
    quality: dict
    warnings: list[str] = field(default_factory=list)


def _fwhm_frames(curves: np.ndarray) -> np.ndarray:
    peak = curves.max(axis=0)
    return (curves >= 0.5 * peak[None, :]).sum(axis=0).astype(np.float64)


def _first_moment(curves: np.ndarray) -> np.ndarray:
    c = np.clip(curves, 0, None)
    t = np.arange(c.shape[0], dtype=np.float64)[:, None]
    area = np.maximum(c.sum(axis=0), 1e-12)
    return (c * t).sum(axis=0) / area


def _pick_cluster(curves: np.ndarray, seed: int) -> np.ndarray:
    """Indices (into curves' columns) of the earliest k-means cluster of area-normalised curves."""
    c = np.clip(curves, 0, None)
    shape = (c / np.maximum(c.sum(axis=0), 1e-12)).T
    k = min(N_CLUSTERS, shape.shape[0])
    if k < 2:
        return np.arange(curves.shape[1])
    _, labels = kmeans2(shape.astype(np.float64), k, minit="++", seed=seed)
    m1 = _first_moment(curves)
    min_size = max(3, int(0.02 * labels.size))  # a singleton of noise is no cluster
    sizes = np.bincount(labels, minlength=k)
    if not (sizes >= min_size).any():
        min_size = int(sizes.max())
    best, key = 0, None
    for lab in np.unique(labels):
        members = labels == lab
        if members.sum() < min_size:
            continue
        score = (round(float(np.mean(m1[members])), 3), -float(np.mean(curves[:, members].max(axis=0))))
        if key is None or score < key:
            best, key = lab, score
    return np.nonzero(labels == best)[0]


def _curve_shape(curve: np.ndarray, first_pass: tuple[int, int], te_s: float) -> dict:
    """The quality record's description of an AIF curve: peak Delta R2*, the signal drop at that peak,
    the peak frame and the first-pass width."""
    a0, a1 = first_pass
    peak = float(curve[a0:a1].max())
    return {"peak_delta_r2s_per_s": round(peak, 4), "peak_drop_fraction": round(1 - float(np.exp(-peak * te_s)), 4),
            "ttp_frame": int(a0 + np.argmax(curve[a0:a1])), "fwhm_frames": float(_fwhm_frames(curve[a0:a1, None])[0])}


def _gamma_variate(t: np.ndarray, a: float, t0: float, alpha: float, beta: float) -> np.ndarray:
    x = np.clip(t - t0, 0.0, None)
    return a * x ** alpha * np.exp(-x / beta)


def _desaturate(curve: np.ndarray, valid: np.ndarray, first_pass: tuple[int, int]) -> np.ndarray | None:
    """``curve`` with its saturated first-pass frames (``valid`` False) replaced by a gamma variate fitted
    to its valid first-pass frames; None when the fit fails or has too few frames to stand on."""
    a0, a1 = first_pass
    t = np.arange(curve.size, dtype=np.float64)
    fit_frames = np.nonzero(valid[a0:a1])[0] + a0
    bad = np.nonzero(~valid[a0:a1])[0] + a0
    if bad.size == 0 or fit_frames.size < 5:
        return None
    rise = int(bad[0])
    t0 = float(max(a0, rise - 2))
    y = curve[fit_frames]
    p0 = (float(max(y.max(), 1e-6)), t0, 3.0, 1.5)
    try:
        p, _ = curve_fit(_gamma_variate, t[fit_frames], y, p0=p0, maxfev=4000,
                         bounds=([0.0, a0 - 2.0, 0.5, 0.3], [np.inf, float(rise), 8.0, 8.0]))
    except (RuntimeError, ValueError):
        return None
    out = curve.astype(np.float64).copy()
    model = _gamma_variate(t, *p)
    out[bad] = np.maximum(model[bad], curve[bad])  # never below what the saturated frame still shows
    return out


def _saturated_aif(conc: np.ndarray, s0: np.ndarray, sd: np.ndarray, te_s: float, first_pass: tuple[int, int],
                   saturated: np.ndarray, hemisphere: np.ndarray | None, avoid_hemisphere: int | None,
                   seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Step 7 of the module docstring: (AIF curve, voxel indices) from saturated arteries, or None."""
    pool = saturated.copy()
    if hemisphere is not None and avoid_hemisphere is not None:
        other = pool & (np.asarray(hemisphere) != avoid_hemisphere) & (np.asarray(hemisphere) > 0)
        if other.sum() >= 3:
            pool = other
    idx = np.nonzero(pool)[0]
    if idx.size < 3:
        return None
    a0, a1 = first_pass
    # Delta R2* above which the signal is under 3 noise SDs or 5 % of S0: that frame says only "saturated".
    # The noise SD is the image's (magnitude noise is about the same in every voxel): an early artery's own
    # baseline SD can hold its bolus's first frames when the series has under 4 baseline frames
    noise = float(np.median(sd[sd > 0])) if (sd > 0).any() else 0.0
    ceiling = -np.log(np.clip(3.0 * noise / s0[idx], 0.05, 0.5)) / te_s
    valid = conc[:, idx] < 0.8 * ceiling[None, :]
    clipped = np.minimum(conc[:, idx], ceiling[None, :])[a0:a1]
    chosen = _pick_cluster(clipped, seed)
    curves, kept = [], []
    for j in chosen:
        c = _desaturate(conc[:, idx[j]].astype(np.float64), valid[:, j], first_pass)
        if c is not None:
            curves.append(c)
            kept.append(idx[j])
    if len(curves) < 3:
        return None
    return np.mean(curves, axis=0), np.asarray(kept)


def select_aif(conc: np.ndarray, s0: np.ndarray, sd: np.ndarray, signal_min: np.ndarray, te_s: float,
               first_pass: tuple[int, int], *, candidates: np.ndarray | None = None,
               hemisphere: np.ndarray | None = None, avoid_hemisphere: int | None = None,
               min_candidates: int = 40, seed: int = 0, dt: float | None = None) -> AifResult:
    """Choose the AIF among voxels ``conc`` (t, voxels) in Delta R2* (1/s).

    ``s0``, ``sd`` baseline mean and temporal SD, ``signal_min`` the lowest signal of each voxel;
    ``first_pass`` the (start, end) frames of the whole-brain first pass; ``candidates`` an optional
    boolean voxel mask (e.g. near the MCA); ``hemisphere`` voxel labels (1, 2) with
    ``avoid_hemisphere`` the label holding the core; ``dt`` the frame interval (s), with which an AIF that
    peaks less than MIN_AIF_LEAD_S before the candidates' median is warned as probably tissue.
    """
    t, nv = conc.shape
    for name, arr in (("s0", s0), ("sd", sd), ("signal_min", signal_min)):
        if np.shape(arr) != (nv,):
            raise ValueError(f"{name} must have one value per voxel ({nv}), got shape {np.shape(arr)}")
    a0, a1 = int(first_pass[0]), int(first_pass[1])
    if not 0 <= a0 < a1 <= t:
        raise ValueError(f"first_pass must be frames 0 <= start < end <= {t}, got {first_pass!r}")
    warnings: list[str] = []
    ok = (s0 > 0) & np.all(np.isfinite(conc), axis=0)
    if candidates is not None:
        ok &= np.asarray(candidates, bool)
    saturated = ok & ((signal_min < 3.0 * sd) | (signal_min < 0.05 * s0))
    pool = ok & ~saturated
    side_used = None
    if hemisphere is not None and avoid_hemisphere is not None:
        other = pool & (np.asarray(hemisphere) != avoid_hemisphere) & (np.asarray(hemisphere) > 0)
        if other.sum() >= min_candidates:
            pool = other
            side_used = int(np.bincount(np.asarray(hemisphere)[other]).argmax())
        else:
            warnings.append("too few AIF candidates in the hemisphere without the core; both hemispheres used")
    idx = np.nonzero(pool)[0]
    if idx.size < 3:
        raise ValueError(f"no usable AIF: {idx.size} unsaturated candidate voxels "
                         f"({int(saturated.sum())} saturated)")
    cur = conc[:, idx].astype(np.float64)
    win = cur[a0:a1]
    peak = win.max(axis=0)
    n_keep = max(min_candidates, int(round(TOP_FRACTION * idx.size)))
    top = np.argsort(-peak)[:n_keep]
    # noise: each curve's baseline noise in Delta R2* against its peak (1 / contrast-to-noise). A shape
    # measure (wiggle around a running mean, curvature) was used first; at a coarse TR it reads the sharp
    # arterial peak itself as irregular (TR 1.5 s: 18 of the 19 unsaturated sylvian arteries of phantom
    # seed 2 dropped, the AIF taken from grey matter), so noise is measured where there is no bolus
    rough = delta_r2s_noise(s0[idx][top], sd[idx][top], te_s) / np.maximum(peak[top], 1e-12)
    top = top[rough <= np.quantile(rough, 0.75)]
    chosen = top[_pick_cluster(win[:, top], seed)]
    if chosen.size >= 2 * N_CLUSTERS:
        chosen = chosen[_pick_cluster(win[:, chosen], seed + 1)]
    fw = _fwhm_frames(win[:, chosen])
    mean_shape = win[:, chosen].mean(axis=1)
    corr = np.array([np.corrcoef(mean_shape, win[:, j])[0, 1] if win[:, j].std() > 0 else 0.0 for j in chosen])
    keep = (fw <= 1.5 * np.median(fw)) & (corr >= 0.9)
    pv_rejected = int((~keep).sum())
    if keep.sum() >= 1:
        chosen = chosen[keep]
    curve = cur[:, chosen].mean(axis=1)
    vox = idx[chosen]
    shape = _curve_shape(curve, (a0, a1), te_s)
    aif_peak, ttp = float(curve[a0:a1].max()), shape["ttp_frame"]
    brain_ttp = float(np.median(a0 + np.argmax(win, axis=0)))
    noise = float(np.median(delta_r2s_noise(s0[vox], sd[vox], te_s)))  # Delta R2* noise, 1/s (s0 > 0 here)
    quality = {
        "n_voxels": int(vox.size), "n_candidates": int(idx.size), "n_saturated_rejected": int(saturated.sum()),
        "n_partial_volume_rejected": pv_rejected, "hemisphere": side_used,
        **shape, "brain_median_ttp_frame": brain_ttp,
        "peak_cnr": round(aif_peak / max(noise, 1e-9), 2),
        "mean_correlation": round(float(np.mean(corr[keep])) if keep.any() else float(np.mean(corr)), 4),
    }
    if vox.size < 3:
        warnings.append(f"AIF from only {vox.size} voxel(s)")
    lead_s = (brain_ttp - ttp) * dt if dt is not None else None
    tissue_like = bool(ttp >= brain_ttp or (lead_s is not None and lead_s < MIN_AIF_LEAD_S))
    quality["tissue_like"] = tissue_like
    tissue_warning = ""
    if tissue_like:
        tissue_warning = ("AIF peaks no earlier than the brain tissue: probably not arterial" if ttp >= brain_ttp else
                          f"AIF peaks only {lead_s:.1f} s before the brain tissue (< {MIN_AIF_LEAD_S:.0f} s): "
                          "probably tissue, not arterial")
        warnings.append(tissue_warning)
    if quality["peak_cnr"] < 10:
        warnings.append(f"AIF contrast-to-noise {quality['peak_cnr']} < 10")
    quality["ok"] = not warnings
    if tissue_like and side_used is not None:
        # the hemisphere without the core held too few unsaturated arteries (a small matrix): search both
        # hemispheres; the earliest cluster there is arterial if the lead check now passes
        both = select_aif(conc, s0, sd, signal_min, te_s, first_pass, candidates=candidates,
                          min_candidates=min_candidates, seed=seed, dt=dt)
        if not both.quality["tissue_like"]:
            note = f"AIF from both hemispheres: the one without the core gave a tissue-like curve ({tissue_warning})"
            inner = both.quality.get("fallback")  # the search over both may itself have needed saturated arteries
            both.quality.update(ok=False, fallback="both hemispheres" + (f", {inner}" if inner else ""),
                                side_tried=side_used)
            return AifResult(both.curve, both.voxels, both.quality, [note] + both.warnings)
    if tissue_like and dt is not None:
        sat = _saturated_aif(conc, s0, sd, te_s, (a0, a1), saturated, hemisphere, avoid_hemisphere, seed)
        if sat is not None:
            s_curve, s_vox = sat
            s_shape = _curve_shape(s_curve, (a0, a1), te_s)
            if (brain_ttp - s_shape["ttp_frame"]) * dt >= MIN_AIF_LEAD_S:
                quality.update(ok=False, tissue_like=False, fallback="saturated arteries", n_voxels=int(s_vox.size),
                               **s_shape)
                note = (f"AIF from {s_vox.size} saturated arterial voxels, their peaks reconstructed by a gamma-variate "
                        f"fit (the unsaturated search gave a tissue-like curve: {tissue_warning}); CBF and CBV scale "
                        "uncertain")
                return AifResult(curve=s_curve.astype(np.float32), voxels=s_vox, quality=quality, warnings=[note])
    return AifResult(curve=curve.astype(np.float32), voxels=vox, quality=quality, warnings=warnings)
