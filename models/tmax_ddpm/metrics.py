"""Image and volume metrics used by evaluate: MAE, PSNR, SSIM, Dice, volumes, DEFUSE-3."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import TMAX_MAX_S


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (agreement on 'no lesion')."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def mae(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    m = np.asarray(mask, bool)
    return float(np.abs(pred[m] - truth[m]).mean()) if m.any() else float("nan")


def psnr(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float = TMAX_MAX_S) -> float:
    m = np.asarray(mask, bool)
    mse = float(((pred[m] - truth[m]) ** 2).mean()) if m.any() else float("nan")
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(pred: np.ndarray, truth: np.ndarray, data_range: float = TMAX_MAX_S, sigma: float = 1.5) -> float:
    """Mean 2D SSIM over slices (Gaussian window 11, sigma 1.5; Wang et al. 2004 constants)."""
    x = torch.as_tensor(np.asarray(pred, np.float32))[:, None]
    y = torch.as_tensor(np.asarray(truth, np.float32))[:, None]
    r = 5
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (r, r, r, r), mode="reflect"), k)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def volume_ml(mask: np.ndarray, voxel_ml: float) -> float:
    return float(np.asarray(mask, bool).sum() * voxel_ml)


def defuse3(core_ml: float, hypo_ml: float) -> dict:
    """DEFUSE-3 target mismatch: core < 70 mL, hypo/core >= 1.8, mismatch >= 15 mL."""
    mismatch = hypo_ml - core_ml
    ratio = float("inf") if core_ml <= 0 else hypo_ml / core_ml
    return {
        "mismatch_ml": mismatch,
        "ratio": ratio,
        "target": bool(core_ml < 70 and ratio >= 1.8 and mismatch >= 15),
    }
