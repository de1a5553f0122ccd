"""DSC-PWI simulation consistent with the Tmax truth.

Indicator dilution: tissue concentration C(t) = CBF * (AIF (*) k)(t), with the effective residue
k(t) = [h (*) R](t - delta): an exponential residue R = exp(-t/MTT), dispersed by h = exp(-t/beta)/beta
and delayed by delta. The argmax of k is delta + t*, t* = ln(MTT/beta) MTT beta / (MTT - beta), and
delta is chosen so that argmax k equals the voxel's Tmax truth - which is exactly what an SVD
deconvolution estimates. Signal: S(t) = S0 exp(-TE k2 C(t)) with Rician noise.

Curves depend only on (tissue kind, Tmax bin), so they come from a small lookup table.
"""

from __future__ import annotations

import numpy as np

from phantom.anatomy import DEEP_GM, GM, WM
from phantom.signal import rician

TR_S = 1.0
N_FRAMES = 60
TE_S = 0.030
_DT = 0.05
_TMAX_BIN = 0.1


def gamma_variate(t: np.ndarray, t0: float, alpha: float = 3.0, beta: float = 1.5) -> np.ndarray:
    x = np.clip(t - t0, 0, None)
    return np.where(t > t0, x**alpha * np.exp(-x / beta), 0.0)


def arterial_input(t: np.ndarray, t0: float) -> np.ndarray:
    """Gamma-variate first pass plus a delayed, dispersed recirculation (mM)."""
    first = gamma_variate(t, t0)
    first = 8.0 * first / first.max()
    recirc = gamma_variate(t, t0 + 9.0, alpha=3.0, beta=3.0)
    recirc = 0.9 * recirc / max(recirc.max(), 1e-9)
    return first + recirc


def residue_peak_offset(mtt: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """t* = argmax of exp-residue (MTT) convolved with exp-dispersion (beta)."""
    beta = np.maximum(beta, 1e-3)
    same = np.isclose(mtt, beta)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.log(mtt / beta) * mtt * beta / (mtt - beta)
    return np.where(same, mtt, t)


def _kind(cls: np.ndarray) -> np.ndarray:
    """0 = no perfusion (CSF, outside), 1 = grey matter (incl. deep), 2 = white matter."""
    k = np.zeros(cls.shape, np.uint8)
    k[(cls == GM) | (cls == DEEP_GM)] = 1
    k[cls == WM] = 2
    return k


def _tissue_curve(t_fine: np.ndarray, aif_fine: np.ndarray, tmax: float, kind: int) -> np.ndarray:
    cbf0, mtt0 = {1: (0.010, 4.0), 2: (0.0045, 5.0)}[kind]  # CBF as a fraction per second
    sev = np.clip((tmax - 2.0) / 12.0, 0, 1)
    cbf = cbf0 * (1 - 0.7 * sev)
    mtt = mtt0 * (1 + 1.2 * sev)
    beta = 0.3 + 0.3 * max(tmax - 1.0, 0.0)
    t_star = float(residue_peak_offset(np.array(mtt), np.array(beta)))
    delta = max(tmax - t_star, 0.0)
    h = np.exp(-t_fine / beta) / beta
    r = np.exp(-t_fine / mtt)
    k = np.convolve(h, r)[: len(t_fine)] * _DT
    shift = int(round(delta / _DT))
    k = np.concatenate([np.zeros(shift), k])[: len(t_fine)]
    c = np.convolve(aif_fine, k)[: len(t_fine)] * _DT * cbf
    return c


def _add_vessels(rng: np.random.Generator, conc: np.ndarray, maps: dict[str, np.ndarray], t_fine: np.ndarray,
                 aif_fine: np.ndarray, pick: np.ndarray) -> dict:
    """Arteries and a venous sinus, so an automatic AIF search has something real to find and to avoid.

    MCA branches run in the sylvian cleft: each voxel holds a random partial-volume fraction (2-50 %)
    of arterial blood, so some curves are clean, some saturate. Branches in hypoperfused territory
    are fed late through collaterals (delay 0.4 s per second of local Tmax above 2 s, dispersed).
    The superior sagittal sinus carries the venous output: the AIF after the brain's transit (5 s
    later, dispersed over 3 s), with the same area, in 30-80 % of the voxel. Writes into ``conc``.
    """
    art = maps["sylvian"] & (maps["tmax"] > 0)
    sinus = maps["sinus"]
    if art.any():
        pv = rng.uniform(0.02, 0.5, size=int(art.sum())).astype(np.float32)
        lag = np.clip(0.4 * (maps["tmax"][art] - 2.0), 0.0, 6.0)
        lag_bins = np.round(lag / 0.5).astype(int)
        curves = np.zeros((lag_bins.max() + 1, pick.size), np.float32)
        for b in np.unique(lag_bins):
            delay = 0.5 * b
            if delay == 0:
                curves[b] = aif_fine[pick]
                continue
            beta = 0.3 * delay
            h = np.exp(-t_fine / beta) / beta
            a = np.convolve(aif_fine, h)[: t_fine.size] * _DT
            a = np.concatenate([np.zeros(int(round(delay / _DT))), a])[: t_fine.size]
            curves[b] = a[pick]
        conc[:, art] = (curves[lag_bins] * pv[:, None]).T
    if sinus.any():
        h = gamma_variate(t_fine, 0.0, alpha=2.0, beta=1.5)
        h /= h.sum() * _DT
        v = np.convolve(aif_fine, h)[: t_fine.size] * _DT
        v = np.concatenate([np.zeros(int(round(5.0 / _DT))), v])[: t_fine.size]
        pv = rng.uniform(0.3, 0.8, size=int(sinus.sum())).astype(np.float32)
        conc[:, sinus] = v[pick][:, None] * pv[None, :]
    return {"artery_voxels": int(art.sum()), "sinus_voxels": int(sinus.sum())}


def simulate_dsc(rng: np.random.Generator, maps: dict[str, np.ndarray], grid) -> tuple[np.ndarray, np.ndarray, dict]:
    """DSC series (t, z, y, x) on ``grid`` from rendered maps (needs tmax, cls, s0)."""
    t0 = float(rng.uniform(8.0, 14.0))
    times = np.arange(N_FRAMES) * TR_S
    t_fine = np.arange(0, times[-1] + TR_S, _DT)
    aif_fine = arterial_input(t_fine, t0)
    kind = _kind(maps["cls"])
    tmax = maps["tmax"]
    bins = np.clip(np.round(tmax / _TMAX_BIN).astype(np.int32), 0, int(30 / _TMAX_BIN))
    pick = np.round(times / _DT).astype(int)
    # lookup table (kind, Tmax bin) -> concentration curve; kind 0 (no perfusion) stays zero
    lut = np.zeros((3, int(bins.max()) + 1, N_FRAMES), np.float32)
    for kd in (1, 2):
        for b in np.unique(bins[kind == kd]):
            lut[kd, b] = _tissue_curve(t_fine, aif_fine, b * _TMAX_BIN, kd)[pick]
    conc = np.moveaxis(lut[kind, bins], -1, 0)
    vessels = _add_vessels(rng, conc, maps, t_fine, aif_fine, pick) if "sylvian" in maps else {}
    k2 = 55.0  # 1/(s mM): Delta R2* per concentration in tissue (~40 % peak drop in grey matter)
    s0 = maps["s0"] * 900.0
    sig = s0[None] * np.exp(-TE_S * k2 * conc)
    snr = float(rng.uniform(60, 90))
    sigma = 900.0 * 0.4 / snr
    out = rician(rng, sig.astype(np.float32), sigma)
    aif = aif_fine[pick]
    info = {
        "tr_s": TR_S,
        "te_s": TE_S,
        "n_frames": N_FRAMES,
        "bolus_arrival_s": round(t0, 3),
        "k2_per_s_per_mM": k2,
        "snr_baseline_wm": round(snr, 2),
        "aif_concentration_mM": [round(float(v), 5) for v in aif],
        "grid": "dwi",
        **vessels,
    }
    return out.astype(np.float32), times.astype(np.float32), info
