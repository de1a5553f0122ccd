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
    """Zero-mean, unit-std Gaussian random field with correlation length ~``scale_mm``.

    Long-range fields are filtered on a coarser grid and interpolated up (same statistics, a
    fraction of the cost: the filter length grows with the scale).
    """
    sigma = scale_mm / MODEL_STEP
    k = max(1, int(sigma // 3))
    shape = tuple(-(-n // k) + 1 for n in MODEL_SHAPE)
    white = rng.standard_normal(shape).astype(np.float32)
    f = ndimage.gaussian_filter(white, sigma=sigma / k, mode="wrap", truncate=3.0)
    if k > 1:
        f = ndimage.zoom(f, k, order=1, prefilter=False)
    f = np.ascontiguousarray(f[: MODEL_SHAPE[0], : MODEL_SHAPE[1], : MODEL_SHAPE[2]])
    f -= f.mean()
    f /= f.std() + 1e-12
    return f


class Sampler:
    """Trilinear interpolation of model-grid fields at a fixed set of head-frame points.

    Corner indices and weights are computed once per target grid; ``many`` gathers a stack of
    fields (last axis) in one pass, which is several times faster than one map_coordinates each.
    """

    def __init__(self, head_points: np.ndarray, grid_min: np.ndarray = MODEL_MIN, step: float = MODEL_STEP,
                 shape: tuple[int, int, int] = MODEL_SHAPE) -> None:
        # grid_min/step/shape describe another axis-aligned (z, y, x) grid (the template atlas)
        self.shape = head_points.shape[:-1]
        idx = (head_points.reshape(-1, 3) - grid_min) / step
        hi = np.array([shape[2], shape[1], shape[0]], dtype=np.float32) - 1.001
        idx = np.clip(idx, 0, hi)
        i0 = np.floor(idx).astype(np.int32)
        w = (idx - i0).astype(np.float32)
        nz, ny, nx = shape
        base = (i0[:, 2] * ny + i0[:, 1]) * nx + i0[:, 0]
        self._corners = []
        for dz in (0, 1):
            wz = w[:, 2] if dz else 1 - w[:, 2]
            for dy in (0, 1):
                wy = w[:, 1] if dy else 1 - w[:, 1]
                for dx in (0, 1):
                    wx = w[:, 0] if dx else 1 - w[:, 0]
                    self._corners.append((base + (dz * ny + dy) * nx + dx, (wz * wy * wx).astype(np.float32)))

    def many(self, stack: np.ndarray) -> np.ndarray:
        """Sample a (nz, ny, nx, K) stack; returns (*shape, K)."""
        flat = stack.reshape(-1, stack.shape[-1])
        out = None
        for ind, wt in self._corners:
            term = flat[ind] * wt[:, None]
            out = term if out is None else out + term
        return out.reshape(*self.shape, stack.shape[-1])

    def __call__(self, field: np.ndarray) -> np.ndarray:
        flat = field.reshape(-1)
        out = None
        for ind, wt in self._corners:
            term = flat[ind] * wt
            out = term if out is None else out + term
        return out.reshape(self.shape)
