"""Intensity normalisation and in-plane resampling, identical for training and inference.

Why here and not in the caller: the network only works on inputs normalised exactly as in training,
so the model package owns the recipe. Volumes are numpy (z, y, x) on the DWI grid:
- DWI b1000 and FLAIR: divided by their median inside the brain (scanner gain cancels), minus 1,
  clipped to [-1, 4]. Outside the brain: -1.
- ADC (1e-6 mm^2/s): /1000 - 1, clipped to [-1, 3]; outside brain -1.
- core mask: {0, 1} -> {-1, 1}.
- Tmax (s): clipped to [0, 20] and scaled to [-1, 1].
In-plane the slice is zero-padded (with the background value) to a square and resized to the model
grid; outputs go back by the inverse resize and crop. z is never resampled (2.5D works slice-wise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import TMAX_MAX_S


def _masked_median(img: np.ndarray, brain: np.ndarray) -> float:
    vals = img[brain & np.isfinite(img)]
    vals = vals[vals > 0]
    if vals.size == 0:
        return 1.0
    med = float(np.median(vals))
    return med if med > 0 else 1.0


def normalise_image(img: np.ndarray, brain: np.ndarray, kind: str) -> np.ndarray:
    """Map a raw conditioning image to the network's range (see module docstring)."""
    img = np.nan_to_num(np.asarray(img, dtype=np.float32))
    brain = np.asarray(brain) > 0
    if kind in ("dwi", "flair"):
        out = np.clip(img / _masked_median(img, brain) - 1.0, -1.0, 4.0)
    elif kind == "adc":
        out = np.clip(img / 1000.0 - 1.0, -1.0, 3.0)
    elif kind == "core":
        out = np.where(img > 0.5, 1.0, -1.0)
    else:
        raise ValueError(f"kind: unknown image kind {kind!r}")
    out = np.where(brain, out, -1.0)
    return out.astype(np.float32)


def standardise_landmarks(img: np.ndarray, brain: np.ndarray, normal: np.ndarray,
                          targets: dict[int, float]) -> np.ndarray:
    """Map a raw DWI or FLAIR so its percentiles over ``normal`` (in units of the brain median) land on
    ``targets`` ({percentile: value}): piecewise linear between them, proportional beyond (0 stays 0, and a
    lesion brighter than the top landmark keeps its ratio to it). Returns the image on its own raw scale.

    Why: a model that reads the spread of normal tissue (a bright cortex) as hypoperfusion can be shown
    every study with the spread of a median training study (Nyul and Udupa's landmark standardisation,
    IEEE TMI 1999), on the inputs alone, no retraining. Experimental: bench.contrast_stress measures it;
    the service does not use it. A study whose landmarks do not increase is returned unchanged.
    """
    img = np.nan_to_num(np.asarray(img, dtype=np.float32))
    brain, normal = np.asarray(brain) > 0, np.asarray(normal) > 0
    if not normal.any():
        return img
    med = _masked_median(img, brain)
    r = img / med
    qs = sorted(targets)
    src = np.percentile(r[normal], qs)
    dst = np.asarray([targets[q] for q in qs], dtype=np.float64)
    if np.any(np.diff(src) <= 1e-6) or np.any(np.diff(dst) <= 0) or src[0] <= 0:
        return img
    out = np.interp(r, src, dst)
    out = np.where(r < src[0], r * dst[0] / src[0], out)
    out = np.where(r > src[-1], r * dst[-1] / src[-1], out)
    return (out * med).astype(np.float32)


def tmax_to_model(tmax_s: np.ndarray | torch.Tensor):
    """Seconds -> [-1, 1]."""
    if isinstance(tmax_s, torch.Tensor):
        return tmax_s.clamp(0, TMAX_MAX_S) / (TMAX_MAX_S / 2) - 1
    return (np.clip(np.nan_to_num(tmax_s), 0, TMAX_MAX_S) / (TMAX_MAX_S / 2) - 1).astype(np.float32)


def tmax_from_model(x: np.ndarray | torch.Tensor):
    """[-1, 1] -> seconds in [0, 20]."""
    if isinstance(x, torch.Tensor):
        return ((x + 1) * (TMAX_MAX_S / 2)).clamp(0, TMAX_MAX_S)
    return np.clip((x + 1) * (TMAX_MAX_S / 2), 0, TMAX_MAX_S)


@dataclass(frozen=True)
class Geometry:
    """How a (y, x) slice maps onto the square model grid: pad to `side`, then resize to `grid`."""

    ny: int
    nx: int
    side: int
    pad_y: int
    pad_x: int
    grid: int

    @classmethod
    def for_shape(cls, ny: int, nx: int, grid: int) -> Geometry:
        side = max(ny, nx)
        return cls(ny, nx, side, (side - ny) // 2, (side - nx) // 2, grid)


def to_grid(vol: np.ndarray | torch.Tensor, geo: Geometry, background: float, mode: str = "area") -> torch.Tensor:
    """(z, y, x) or (c, z, y, x) -> same leading dims with (grid, grid) in-plane."""
    t = torch.as_tensor(np.ascontiguousarray(vol) if isinstance(vol, np.ndarray) else vol, dtype=torch.float32)
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, geo.ny, geo.nx)
    if geo.side != geo.ny or geo.side != geo.nx:
        t = F.pad(
            t,
            (geo.pad_x, geo.side - geo.nx - geo.pad_x, geo.pad_y, geo.side - geo.ny - geo.pad_y),
            value=background,
        )
    if geo.side != geo.grid:
        if mode == "nearest" or geo.grid > geo.side:
            kw = {"mode": "bilinear", "align_corners": False} if mode != "nearest" else {"mode": "nearest"}
            t = F.interpolate(t, size=(geo.grid, geo.grid), **kw)
        else:
            t = F.interpolate(t, size=(geo.grid, geo.grid), mode="area")
    return t.reshape(*lead, geo.grid, geo.grid)


def from_grid(vol: torch.Tensor | np.ndarray, geo: Geometry) -> np.ndarray:
    """Inverse of :func:`to_grid` (bilinear up-sampling, then crop): (..., grid, grid) -> (..., y, x)."""
    t = torch.as_tensor(vol, dtype=torch.float32)
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, geo.grid, geo.grid)
    if geo.side != geo.grid:
        t = F.interpolate(t, size=(geo.side, geo.side), mode="bilinear", align_corners=False)
    t = t[..., geo.pad_y : geo.pad_y + geo.ny, geo.pad_x : geo.pad_x + geo.nx]
    return t.reshape(*lead, geo.ny, geo.nx).numpy()


def prepare_conditioning(
    images: dict[str, np.ndarray], brain: np.ndarray, inputs: tuple[str, ...], grid: int
) -> tuple[torch.Tensor, Geometry]:
    """Normalise and resample the conditioning images -> (len(inputs), z, grid, grid) and the geometry."""
    brain = np.asarray(brain) > 0
    if brain.ndim != 3:
        raise ValueError(f"brain: expected a (z, y, x) volume, got shape {brain.shape}")
    chans = []
    for name in inputs:
        if images.get(name) is None:
            raise ValueError(f"{name}: this model needs a {name} volume (inputs {inputs})")
        img = np.asarray(images[name])
        if img.shape != brain.shape:
            raise ValueError(f"{name}: shape {img.shape} differs from brain mask shape {brain.shape}")
        chans.append(normalise_image(img, brain, name))
    geo = Geometry.for_shape(brain.shape[1], brain.shape[2], grid)
    cond = to_grid(np.stack(chans), geo, background=-1.0)
    if "core" in inputs:  # keep the core mask binary after resampling
        i = inputs.index("core")
        cond[i] = torch.where(cond[i] > 0, 1.0, -1.0)
    return cond, geo


def stack_neighbours(cond: torch.Tensor, k: int, z_index: torch.Tensor | None = None) -> torch.Tensor:
    """(c, z, h, w) -> (z, c*k, h, w): each slice with its k-1 neighbours (edge slices replicated).

    Channel order is image-major: [img0 z-2..z+2, img1 z-2..z+2, ...].
    """
    c, nz, h, w = cond.shape
    half = k // 2
    zs = torch.arange(nz) if z_index is None else z_index
    offs = torch.arange(-half, half + 1)
    idx = (zs[:, None] + offs[None, :]).clamp(0, nz - 1)  # (n, k)
    out = cond[:, idx]  # (c, n, k, h, w)
    return out.permute(1, 0, 2, 3, 4).reshape(len(zs), c * k, h, w)
