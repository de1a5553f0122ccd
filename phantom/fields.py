"""Smooth random fields on a coarse head-frame model grid, sampled onto any image grid.

Everything that must look the same on the DWI and the FLAIR grid (cortical folding, territory
borders, Tmax, the core) is a continuous field here, so both acquisitions see one anatomy and one
lesion; only the sampling differs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Head-frame box covered by the model grid (mm, x/y/z = left/posterior/superior).
MODEL_MIN = np.array([-111.0, -132.0, -105.0], dtype=np.float32)
MODEL_STEP = 3.0
MODEL_SHAPE = (70, 88, 75)  # (z, y, x)


def model_points() -> np.ndarray:
    """Head-frame coordinates of every model-grid voxel, shape (nz, ny, nx, 3) as (x, y, z)."""
    nz, ny, nx = MODEL_SHAPE
    z, y, x = np.meshgrid(
        np.arange(nz, dtype=np.float32), np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32),
        indexing="ij",
    )
    return np.stack([x, y, z], axis=-1) * MODEL_STEP + MODEL_MIN


def smooth_noise(rng: np.random.Generator, scale_mm: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ~``scale_mm``."""
    white = rng.standard_normal(MODEL_SHAPE).astype(np.float32)
    f = ndimage.gaussian_filter(white, sigma=scale_mm / MODEL_STEP, mode="wrap")
    f -= f.mean()
    f /= f.std() + 1e-12
    return f


class Sampler:
    """Linear interpolation of model-grid fields at a fixed set of head-frame points.

    The index coordinates are computed once per target grid and reused for every field.
    """

    def __init__(self, head_points: np.ndarray) -> None:
        self.shape = head_points.shape[:-1]
        idx = (head_points.reshape(-1, 3) - MODEL_MIN) / MODEL_STEP
        self._coords = np.stack([idx[:, 2], idx[:, 1], idx[:, 0]]).astype(np.float32)

    def __call__(self, field: np.ndarray, order: int = 1) -> np.ndarray:
        out = ndimage.map_coordinates(field, self._coords, order=order, mode="nearest", prefilter=False)
        return out.reshape(self.shape)
