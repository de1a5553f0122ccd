"""Digital reference grids for DSC deconvolution in the style of Kudo et al. (Radiology 2013;267:201).

``reference_set`` is built on the phantom's own DSC model (``phantom.dsc``: gamma-variate AIF with
recirculation, exponential residue, exponential dispersion): every combination of delay, MTT, CBF,
dispersion, TR and SNR, a few noise realisations each. Truth Tmax is the argmax of the delayed,
dispersed residue (what deconvolution estimates; Kudo's phantom has no dispersion, so there the argmax
is the delay itself), truth CBV = CBF x MTT.

``alternative_set`` shares none of those models, so that a method fitted to the phantom's shapes is
caught out: Parker's population AIF (Parker et al., MRM 2006;56:993; two Gaussians and a
sigmoid-modulated exponential), gamma-variate dispersion kernels (shape 2), and Kudo's exponential and
linear residues plus a gamma-distributed transit-time residue (Mouridsen et al., MRM 2006;55:524).

``third_set`` shares models with neither, and its residues are plateau-like, where the argmax is least
defined: a lognormal first-pass AIF over a slowly rising recirculation tail, lognormal dispersion kernels,
and lognormal (sigma 0.6) and bi-exponential (70 % fast) transit residues. It was written to judge a
change to the fit's shape family, and is reported beside the other two, never tuned to.

Used by tests/unit/test_perfusion_reference.py and bench/perfusion.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import gamma as gamma_dist
from scipy.stats import lognorm

from models.perfusion import concentration, detect_bolus
from phantom.dsc import arterial_input, residue_peak_offset

DELAYS_S = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
MTTS_S = (3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
CBFS = (10.0, 20.0, 40.0, 60.0, 80.0)  # mL/100 g/min
DISPERSIONS_S = (0.5, 2.0)  # exponential dispersion time constant beta
TRS_S = (1.0, 1.3, 1.6)
SNRS = (20.0, 50.0, 100.0)
TE_S = 0.030
K2 = 55.0  # 1/(s mM), as phantom.dsc
N_FRAMES = 60
AIF_T0_S = 10.0
_DT = 0.05


@dataclass
class ReferenceSet:
    """Signals (t, voxels), the AIF as Delta R2* (t,), and the truth per voxel."""

    tr: float
    snr: float
    signal: np.ndarray
    aif_r2s: np.ndarray
    delay: np.ndarray
    mtt: np.ndarray
    cbf: np.ndarray
    beta: np.ndarray
    tmax: np.ndarray

    @property
    def cbv(self) -> np.ndarray:
        """mL/100 g."""
        return self.cbf * self.mtt / 60.0


def _tissue(t_fine: np.ndarray, aif_fine: np.ndarray, delay: float, mtt: float, beta: float) -> np.ndarray:
    """Concentration for CBF = 1/s: AIF (*) [h (*) R](t - delay), negative delays shift earlier."""
    h = np.exp(-t_fine / beta) / beta
    r = np.exp(-t_fine / mtt)
    k = np.convolve(h, r)[: t_fine.size] * _DT
    return _delayed(np.convolve(aif_fine, k)[: t_fine.size] * _DT, delay)


def _delayed(c: np.ndarray, delay: float) -> np.ndarray:
    """``c`` on the fine grid moved later by ``delay`` s (earlier when negative), length kept."""
    shift = int(round(delay / _DT))
    if shift >= 0:
        return np.concatenate([np.zeros(shift), c])[: c.size]
    return np.concatenate([c[-shift:], np.zeros(-shift)])


def _noisy_set(tr: float, snr: float, rng: np.random.Generator, rows: list, curves: list, reps: int,
               aif_mm: np.ndarray) -> ReferenceSet:
    """Concentration curves (mM, one per row) to DSC magnitude signal with Rician noise at ``snr``,
    ``reps`` noise draws each; what both reference grids share."""
    conc = np.repeat(np.array(curves).T, reps, axis=1)  # (t, combos*reps), mM
    truth = np.repeat(np.array(rows), reps, axis=0)
    clean = np.exp(-TE_S * K2 * conc)
    sigma = 1.0 / snr
    noisy = np.sqrt((clean + rng.normal(0, sigma, clean.shape)) ** 2 + rng.normal(0, sigma, clean.shape) ** 2)
    return ReferenceSet(tr=tr, snr=snr, signal=noisy.astype(np.float32), aif_r2s=(K2 * aif_mm).astype(np.float32),
                        delay=truth[:, 0], mtt=truth[:, 1], cbf=truth[:, 2], beta=truth[:, 3], tmax=truth[:, 4])


def reference_set(tr: float, snr: float, reps: int = 3, seed: int = 0, delays=DELAYS_S, mtts=MTTS_S,
                  cbfs=CBFS, betas=DISPERSIONS_S) -> ReferenceSet:
    """All (delay, MTT, CBF, dispersion) combinations at one TR and SNR, ``reps`` noise draws each."""
    rng = np.random.default_rng([seed, int(tr * 100), int(snr)])
    t_fine = np.arange(0, N_FRAMES * tr + 20.0, _DT)
    aif_fine = arterial_input(t_fine, AIF_T0_S)
    pick = np.round(np.arange(N_FRAMES) * tr / _DT).astype(int)
    rows, curves = [], []
    for d in delays:
        for m in mtts:
            for b in betas:
                shape = _tissue(t_fine, aif_fine, d, m, b)[pick]
                tmax = d + float(residue_peak_offset(np.array(m), np.array(b)))
                for f in cbfs:
                    rows.append((d, m, f, b, tmax))
                    curves.append(shape * f / 6000.0)
    return _noisy_set(tr, snr, rng, rows, curves, reps, aif_fine[pick])


ALT_DELAYS_S = (-3.0, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0)
ALT_MTTS_S = (3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
ALT_CBFS = (10.0, 30.0, 60.0)
ALT_DISPERSION_MEANS_S = (0.5, 1.5, 3.0)
ALT_RESIDUES = ("exponential", "linear", "gamma")
ALT_AIF_T0_S = 8.0


def parker_aif(t_s: np.ndarray, t0: float, peak_mm: float = 8.0) -> np.ndarray:
    """Parker's population AIF (time in minutes in the paper) starting at ``t0``, scaled to ``peak_mm``."""
    t = (t_s - t0) / 60.0
    c = (0.809 / (0.0563 * np.sqrt(2 * np.pi)) * np.exp(-((t - 0.17046) ** 2) / (2 * 0.0563**2))
         + 0.330 / (0.132 * np.sqrt(2 * np.pi)) * np.exp(-((t - 0.365) ** 2) / (2 * 0.132**2))
         + 1.050 * np.exp(-0.1685 * t) / (1 + np.exp(-38.078 * (t - 0.483))))
    c = np.where(t_s > t0, c, 0.0)
    return c * peak_mm / c.max()


def _alt_residue(kind: str, tau: np.ndarray, mtt: float) -> np.ndarray:
    if kind == "exponential":
        return np.exp(-tau / mtt)
    if kind == "linear":
        return np.clip(1.0 - tau / (2.0 * mtt), 0.0, 1.0)
    return gamma_dist.sf(tau, 3.0, scale=mtt / 3.0)


def _model_grid(tr: float, snr: float, reps: int, rng: np.random.Generator, aif, kernel, residue, kinds,
                delays, mtts, dispersion_means, cbfs) -> ReferenceSet:
    """Every (residue kind, delay, MTT, mean dispersion, CBF) on one AIF: ``aif(t_fine)`` in mM,
    ``kernel(t_fine, mean)`` a dispersion kernel (normalised here), ``residue(kind, tau, mtt)``. Truth Tmax is
    the argmax of the delayed, dispersed residue; ``beta`` holds the mean dispersion time."""
    t_fine = np.arange(0, N_FRAMES * tr + 20.0, _DT)
    aif_fine = aif(t_fine)
    pick = np.round(np.arange(N_FRAMES) * tr / _DT).astype(int)
    rows, curves = [], []
    for kind in kinds:
        for d in delays:
            for m in mtts:
                for mean_disp in dispersion_means:
                    h = kernel(t_fine, mean_disp)
                    h /= h.sum() * _DT
                    k = np.convolve(h, residue(kind, t_fine, m))[: t_fine.size] * _DT
                    tmax = d + float(t_fine[np.argmax(k)])
                    c = _delayed(np.convolve(aif_fine, k)[: t_fine.size] * _DT, d)
                    for f in cbfs:
                        rows.append((d, m, f, mean_disp, tmax))
                        curves.append(c[pick] * f / 6000.0)
    return _noisy_set(tr, snr, rng, rows, curves, reps, aif_fine[pick])


def alternative_set(tr: float, snr: float, reps: int = 1, seed: int = 0) -> ReferenceSet:
    """The second grid: other AIF, dispersion and residue models; ``beta`` holds the mean dispersion time."""
    return _model_grid(tr, snr, reps, np.random.default_rng([seed, int(tr * 100), int(snr), 7]),
                       lambda t: parker_aif(t, ALT_AIF_T0_S), lambda t, mean: gamma_dist.pdf(t, 2.0, scale=mean / 2.0),
                       _alt_residue, ALT_RESIDUES, ALT_DELAYS_S, ALT_MTTS_S, ALT_DISPERSION_MEANS_S, ALT_CBFS)


THIRD_DELAYS_S = (-2.0, 0.0, 1.5, 3.0, 5.0)
THIRD_MTTS_S = (3.5, 5.0, 7.0, 10.0, 14.0, 20.0)
THIRD_CBFS = (15.0, 35.0, 70.0)
THIRD_DISPERSION_MEANS_S = (0.7, 2.0)
THIRD_RESIDUES = ("lognormal", "biexponential")


def lognormal_aif(t_s: np.ndarray, t0: float = 9.0, peak_mm: float = 8.0) -> np.ndarray:
    """A lognormal first pass (median 4 s after ``t0``) over a tail that rises to 8 % of the peak."""
    x = np.clip(t_s - t0, 1e-9, None)
    first = lognorm.pdf(x, 0.35, scale=4.0)
    tail = 0.08 * first.max() / (1.0 + np.exp(-(x - 10.0) / 2.0))
    c = np.where(t_s > t0, first + tail, 0.0)
    return c * peak_mm / c.max()


def _third_residue(kind: str, tau: np.ndarray, mtt: float) -> np.ndarray:
    if kind == "lognormal":
        sigma = 0.6
        return lognorm.sf(tau, sigma, scale=mtt * np.exp(-sigma * sigma / 2))  # mean transit time = mtt
    fast, t_fast = 0.7, 0.4 * mtt
    t_slow = (mtt - fast * t_fast) / (1 - fast)
    return fast * np.exp(-tau / t_fast) + (1 - fast) * np.exp(-tau / t_slow)


def third_set(tr: float, snr: float, reps: int = 1, seed: int = 0) -> ReferenceSet:
    """The third grid (module docstring); ``beta`` holds the mean dispersion time."""
    return _model_grid(tr, snr, reps, np.random.default_rng([seed, int(tr * 100), int(snr), 11]), lognormal_aif,
                       lambda t, mean: lognorm.pdf(t, 0.5, scale=mean * np.exp(-0.125)), _third_residue,
                       THIRD_RESIDUES, THIRD_DELAYS_S, THIRD_MTTS_S, THIRD_DISPERSION_MEANS_S, THIRD_CBFS)


def delta_r2s(signal: np.ndarray) -> np.ndarray:
    """A grid's signals (t, curves) as Delta R2* (1/s), the bolus found on their mean as the method does."""
    return concentration(signal, detect_bolus(signal.mean(axis=1)), TE_S)[0]
