"""Perfusion-weighted diffusion loss.

Why weighted: the hypoperfused region is a small fraction of the slice, yet it is the clinical
answer (Tmax > 6 s). Voxels inside it, and a band around its border (where the threshold decision
is made), get extra weight so the network spends its capacity there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .preprocess import tmax_to_model


def perfusion_weights(
    x0: torch.Tensor,
    threshold_s: float = 6.0,
    hypo_weight: float = 2.0,
    border_weight: float = 2.0,
    border_px: int = 2,
) -> torch.Tensor:
    """Weight map for a batch of clean Tmax slices ``x0`` in model scale, shape (b, 1, h, w).

    weight = 1 + hypo_weight * [Tmax > threshold] + border_weight * [within border_px of the edge].
    """
    if hypo_weight < 0 or border_weight < 0 or border_px < 0:
        raise ValueError("hypo_weight, border_weight and border_px must be >= 0")
    thr = float(tmax_to_model(torch.tensor(threshold_s)))
    mask = (x0 > thr).float()
    w = 1.0 + hypo_weight * mask
    if border_px > 0 and border_weight > 0:
        size = 2 * border_px + 1
        dil = F.max_pool2d(mask, size, stride=1, padding=border_px)
        ero = -F.max_pool2d(-mask, size, stride=1, padding=border_px)
        w = w + border_weight * (dil - ero)
    return w


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of weights * squared error, normalised by the mean weight so the scale stays comparable."""
    err = (pred.float() - target.float()) ** 2
    return (weights * err).sum() / weights.sum()
