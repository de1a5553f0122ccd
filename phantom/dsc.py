"""DSC-PWI simulation consistent with the Tmax truth.

Indicator dilution: tissue concentration C(t) = CBF * (AIF (*) k)(t), with the effective residue
k(t) = [h (*) R](t - delta): an exponential residue R = exp(-t/MTT), dispersed by h = exp(-t/beta)/beta
and delayed by delta. The argmax of k is delta + t*, t* = ln(MTT/beta) MTT beta / (MTT - beta), and
delta is chosen so that argmax k equals the voxel's Tmax truth - which is exactly what an SVD
deconvolution estimates. Signal: S(t) = S0 exp(-TE k2 C(t)) with Rician noise.

Curves depend only on (tissue kind, Tmax bin), so they come from a small lookup table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phantom.anatomy import DEEP_GM, GM, WM
from phantom.signal import rician

TR_S = 1.0
N_FRAMES = 60
TE_S = 0.030
_DT = 0.05
_TMAX_BIN = 0.1


@dataclass(frozen=True)
class DscAcquisition:
    """How the DSC series is acquired. The defaults are the unrandomised phantom's (TR 1.0 s, TE 30 ms,
    60 frames; baseline SNR and bolus arrival drawn per case). ``sample`` draws the ranges a clinical
    protocol spans, so the DSC method is not fitted to one acquisition: at TR 1.5 s, before the AIF
    search was made TR-independent, every phantom case lost its arterial AIF."""

    tr_s: float = TR_S
    te_s: float = TE_S
    n_frames: int = N_FRAMES
    snr: tuple[float, float] = (60.0, 90.0)  # baseline white-matter SNR, drawn uniformly
    arrival_s: tuple[float, float] = (8.0, 14.0)  # bolus arrival, drawn uniformly

    def __post_init__(self) -> None:
        if not 0.3 <= self.tr_s <= 3.0:
            raise ValueError(f"tr_s must be 0.3..3 s, got {self.tr_s!r}")
        if not 0.005 <= self.te_s <= 0.1:
            raise ValueError(f"te_s must be 5..100 ms, got {self.te_s!r}")
        if self.n_frames < 20:
            raise ValueError(f"n_frames must be at least 20, got {self.n_frames!r}")
        if not 0 < self.snr[0] <= self.snr[1]:
            raise ValueError(f"snr must be a range (low, high) of positive values, got {self.snr!r}")
        if not 0 < self.arrival_s[0] <= self.arrival_s[1] < 0.5 * self.tr_s * self.n_frames:
            raise ValueError(f"arrival_s must be a range inside the first half of the series, got {self.arrival_s!r}")

    @classmethod
    def sample(cls, rng: np.random.Generator) -> DscAcquisition:
        """TR 1.0-1.8 s, TE 25-50 ms (3 T to 1.5 T), 70-100 s of series, baseline SNR 30-108, bolus at 5-16 s."""
        tr = float(rng.uniform(1.0, 1.8))
        lo = float(rng.uniform(30.0, 90.0))
        return cls(tr_s=round(tr, 3), te_s=round(float(rng.uniform(0.025, 0.050)), 4),
                   n_frames=int(np.ceil(float(rng.uniform(70.0, 100.0)) / tr)), snr=(lo, lo * 1.2),
                   arrival_s=(5.0, 16.0))


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


def simulate_dsc(rng: np.random.Generator, maps: dict[str, np.ndarray], grid,
                 acq: DscAcquisition | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """DSC series (t, z, y, x) on ``grid`` from rendered maps (needs tmax, cls, s0), acquired as ``acq``
    (default: the unrandomised phantom's acquisition, whose draws it keeps unchanged)."""
    acq = acq or DscAcquisition()
    t0 = float(rng.uniform(*acq.arrival_s))
    times = np.arange(acq.n_frames) * acq.tr_s
    t_fine = np.arange(0, times[-1] + acq.tr_s, _DT)
    aif_fine = arterial_input(t_fine, t0)
    kind = _kind(maps["cls"])
    tmax = maps["tmax"]
    bins = np.clip(np.round(tmax / _TMAX_BIN).astype(np.int32), 0, int(30 / _TMAX_BIN))
    pick = np.round(times / _DT).astype(int)
    # lookup table (kind, Tmax bin) -> concentration curve; kind 0 (no perfusion) stays zero
    lut = np.zeros((3, int(bins.max()) + 1, acq.n_frames), np.float32)
    for kd in (1, 2):
        for b in np.unique(bins[kind == kd]):
            lut[kd, b] = _tissue_curve(t_fine, aif_fine, b * _TMAX_BIN, kd)[pick]
    conc = np.moveaxis(lut[kind, bins], -1, 0)
    vessels = _add_vessels(rng, conc, maps, t_fine, aif_fine, pick) if "sylvian" in maps else {}
    k2 = 55.0  # 1/(s mM): Delta R2* per concentration in tissue (~40 % peak drop in grey matter)
    s0 = maps["s0"] * 900.0
    sig = s0[None] * np.exp(-acq.te_s * k2 * conc)
    snr = float(rng.uniform(*acq.snr))
    sigma = 900.0 * 0.4 / snr
    out = rician(rng, sig.astype(np.float32), sigma)
    aif = aif_fine[pick]
    info = {
        "tr_s": acq.tr_s,
        "te_s": acq.te_s,
        "n_frames": acq.n_frames,
        "bolus_arrival_s": round(t0, 3),
        "k2_per_s_per_mM": k2,
        "snr_baseline_wm": round(snr, 2),
        "aif_concentration_mM": [round(float(v), 5) for v in aif],
        "grid": "dwi",
        **vessels,
    }
    return out.astype(np.float32), times.astype(np.float32), info
