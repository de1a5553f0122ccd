"""MR signal models: DWI (b0, b1000 trace), ADC, FLAIR and a T1 distractor from tissue classes.

Relative signal per class is a rough 1.5-3 T clinical contrast (b0 is a T2-weighted spin-echo EPI
with fat saturation; FLAIR nulls CSF). Then: point-spread blur, a smooth coil bias field and Rician
noise (magnitude of a complex signal with Gaussian noise in both channels), in scanner-like units.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from phantom.anatomy import AIR, CSF, DEEP_GM, EYE, GM, MARROW, OTHER, SCALP, SKULL, WM

B_VALUE = 1000.0  # s/mm2

#            AIR  SCALP SKULL MARROW CSF   GM    WM    DEEP  OTHER EYE
_S0 = np.array([0, 0.22, 0.03, 0.08, 1.00, 0.52, 0.40, 0.45, 0.12, 0.95], np.float32)
_ADC = np.array([0, 1000, 1000, 600, 3000, 850, 760, 780, 1200, 2900], np.float32)
_FLAIR = np.array([0, 0.75, 0.04, 0.55, 0.05, 0.56, 0.42, 0.48, 0.22, 0.05], np.float32)
_T1 = np.array([0, 0.85, 0.05, 0.80, 0.12, 0.48, 0.72, 0.55, 0.35, 0.10], np.float32)
assert [AIR, SCALP, SKULL, MARROW, CSF, GM, WM, DEEP_GM, OTHER, EYE] == list(range(10))


def flair_core_ratio(onset_h: float) -> float:
    """Relative FLAIR signal of the core vs normal tissue: ~1 early, rising after ~4.5 h.

    This is the DWI-FLAIR mismatch: a core invisible on FLAIR suggests onset < 4.5 h.
    """
    return float(1.0 + 0.5 / (1.0 + np.exp(-(onset_h - 5.5) / 1.0)))


def core_t2_gain(onset_h: float) -> float:
    """Vasogenic oedema raises T2 (b0) in the core over hours."""
    return float(0.04 + 0.3 * (1 - np.exp(-onset_h / 10.0)))


def rician(rng: np.random.Generator, s: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.standard_normal(s.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(s.shape, dtype=np.float32) * sigma
    return np.sqrt((s + n1) ** 2 + n2**2).astype(np.float32)


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field, ~1 +- strength, varying mostly in-plane."""
    nz, ny, nx = shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx),
                             indexing="ij")
    c = rng.uniform(-1, 1, size=6)
    f = c[0] * xx + c[1] * yy + 0.4 * c[2] * zz + 0.6 * c[3] * xx * yy + 0.5 * c[4] * (xx**2 + yy**2) \
        + 0.3 * c[5] * zz**2
    f = f / (np.abs(f).max() + 1e-6)
    return (1.0 + strength * f).astype(np.float32)


def blur_inplane(a: np.ndarray, sigma_px: float) -> np.ndarray:
    return ndimage.gaussian_filter(a, sigma=(0, sigma_px, sigma_px), mode="nearest")


def default_tables() -> dict[str, np.ndarray]:
    """Per-class relative contrasts (index = phantom.anatomy class code) of the unrandomised phantom."""
    return {"s0": _S0.copy(), "adc": _ADC.copy(), "flair": _FLAIR.copy(), "t1": _T1.copy()}


def mixture_maps(fractions: np.ndarray, tables: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Partial-volume S0, ADC, FLAIR and T1 of voxels holding class ``fractions`` (last axis, classes 0..K-1).

    Signals mix linearly; the ADC is the one a scanner would measure from the mixed b0 and b1000.
    """
    tb = tables or default_tables()
    k = fractions.shape[-1]
    s0 = fractions @ tb["s0"][:k]
    s1 = fractions @ (tb["s0"][:k] * np.exp(-B_VALUE * tb["adc"][:k] * 1e-6))
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.where(s0 > 1e-4, np.log(np.maximum(s0, 1e-6) / np.maximum(s1, 1e-9)) / B_VALUE * 1e6, 0.0)
    return {"s0": s0.astype(np.float32), "adc": adc.astype(np.float32),
            "flair": (fractions @ tb["flair"][:k]).astype(np.float32), "t1": (fractions @ tb["t1"][:k]).astype(np.float32)}


def tissue_maps(t: dict[str, np.ndarray], lesion: dict[str, np.ndarray], onset_h: float,
                tables: dict[str, np.ndarray] | None = None, base: dict[str, np.ndarray] | None = None
                ) -> dict[str, np.ndarray]:
    """Noise-free S0, ADC, FLAIR and T1 (relative units) with every pathology applied.

    ``tables`` replaces the per-class contrasts (domain randomisation); ``base`` gives the healthy
    maps directly (partial-volume mixtures of the template family) instead of one class per voxel.
    """
    cls = t["cls"]
    if base is not None:
        s0, adc, fl, t1 = base["s0"], base["adc"], base["flair"], base["t1"]
    else:
        tb = tables or {"s0": _S0, "adc": _ADC, "flair": _FLAIR, "t1": _T1}
        s0, adc, fl, t1 = tb["s0"][cls], tb["adc"][cls], tb["flair"][cls], tb["t1"][cls]
    # confounders: WMH (FLAIR-bright, ADC up) and old infarct (cavity + gliotic rim)
    w = t["wmh"]
    s0 = s0 * (1 + 0.35 * w)
    adc = adc + 330 * w
    fl = fl + 0.5 * w
    t1 = t1 - 0.25 * w
    rim = t["old_rim"]
    s0 = np.where(rim, 0.62, s0)
    adc = np.where(rim, 1350.0, adc)
    fl = np.where(rim, 0.88, fl)
    t1 = np.where(rim, 0.35, t1)
    cav = t["old_cavity"]
    fl = np.where(cav, 0.12, fl)
    adc = np.where(cav, 2500.0, adc)

    # penumbra: mild ADC decline with delay (cytotoxic onset below the core threshold)
    tmax = lesion["tmax"]
    par = t["parenchyma"] & ~rim
    # (~6 % across the Tmax 6 s threshold, up to ~8.5 % in severely delayed tissue)
    drop = 0.06 / (1.0 + np.exp(-(tmax - 6.0) / 0.8)) + 0.025 * np.clip((tmax - 6.0) / 8.0, 0, 1)
    drop = drop * float(lesion.get("penumbral_scale", 1.0))  # randomised: full, weak or absent (x 1.0 is exact)
    adc = np.where(par, adc * (1 - drop), adc)
    s0 = np.where(par, s0 * (1 + 0.25 * drop), s0)

    # core
    core = lesion["core"]
    adc = np.where(core, lesion["core_adc"], adc)
    s0 = np.where(core, s0 * (1 + core_t2_gain(onset_h)), s0)
    fl = np.where(core, fl * flair_core_ratio(onset_h), fl)
    t1 = np.where(core, t1 * 0.92, t1)

    # FLAIR vascular hyperintensities: slow flow in sulcal vessels over the Tmax > 6 s territory
    fvh = lesion["fvh_strength"]
    fl = np.where(fvh > 0, np.maximum(fl, 0.7 + 0.45 * fvh), fl)
    return {"s0": s0.astype(np.float32), "adc": adc.astype(np.float32), "flair": fl.astype(np.float32),
            "t1": t1.astype(np.float32)}


def acquire_dwi(rng: np.random.Generator, s0: np.ndarray, adc: np.ndarray, snr: float, bias: np.ndarray,
                psf_px: float, scale: float = 1100.0, noise=rician) -> dict[str, np.ndarray]:
    """b0, b1000 (trace) and scanner ADC (1e-6 mm2/s) from noisy magnitudes, as a scanner computes it."""
    s1 = s0 * np.exp(-B_VALUE * adc * 1e-6)
    s0b = blur_inplane(s0, psf_px) * bias * scale
    s1b = blur_inplane(s1, psf_px) * bias * scale
    sigma = scale * _S0[WM] / snr
    b0 = noise(rng, s0b, sigma)
    b1 = noise(rng, s1b, sigma)
    mask = ndimage.binary_opening(b0 > 0.12 * scale * _S0[WM] * 2.0, iterations=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(b0, 1e-3) / np.maximum(b1, 1e-3)) / B_VALUE * 1e6
    a = np.where(mask, np.clip(a, 0, 4000), 0).astype(np.float32)
    return {"b0": b0, "dwi": b1, "adc": a}


def acquire(rng: np.random.Generator, rel: np.ndarray, snr: float, bias: np.ndarray, psf_px: float,
            scale: float, ref: float, noise=rician) -> np.ndarray:
    s = blur_inplane(rel, psf_px) * bias * scale
    return noise(rng, s, scale * ref / snr)
