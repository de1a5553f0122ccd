"""Deconvolution of tissue concentration curves by the arterial input: oSVD and sSVD.

Indicator dilution gives ``C(t) = CBF * (AIF (*) R)(t)``; deconvolution recovers ``k = CBF * R``.

* **oSVD** (Wu et al., MRM 2003;50:164): the AIF is zero-padded to ``L = 2N`` and written as a
  block-circulant matrix, which makes the estimate insensitive to the tracer arrival difference
  between AIF and tissue (a tissue curve that arrives *before* the AIF wraps around to the end of
  the residue). Each voxel gets its own truncation: the least regularisation whose residue has an
  oscillation index ``OI = 1/(L max|k|) * sum |k[j] - 2k[j-1] + k[j-2]|`` at or below the
  threshold (default 0.035, the second-difference OI of Wu's method as implemented in the
  dsc-mri-toolbox). There is one SVD per study (of the AIF matrix); all voxels are solved together
  in SVD space, and the per-voxel choice of truncation is a bisection over the number of kept
  singular values (OI grows with it), i.e. ``ceil(log2 L)`` matrix products for the whole brain
  instead of one per voxel and threshold.
* **sSVD** (Østergaard et al., MRM 1996;36:715): the plain lower-triangular (Toeplitz) matrix with a
  fixed 20 % truncation - the baseline, known to be biased by tracer delay and unable to report a
  negative delay.

Tmax is the time of the residue's maximum with parabolic sub-sample refinement; on the circulant
residue indices past ``L/2`` mean the tissue led the AIF, so they are reported as negative times.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

_F = TypeVar("_F", bound=Callable)


def single_threaded_blas(fn: _F) -> _F:
    """Run ``fn``'s matrix products on one OpenBLAS thread.

    Why: in the full test run (one process that had loaded torch, ONNX Runtime and OpenVINO and
    forked many subprocesses) numpy's multi-threaded OpenBLAS sgemm in oSVD spun for over ten
    minutes in its own synchronisation with no worker thread left to answer. The products here are
    ~1 GFLOP per chunk, about 20 ms on one core, so one thread costs nothing that matters and cannot
    hang that way.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

DEFAULT_OI = 0.035
SSVD_THRESHOLD = 0.2


def _check_inputs(aif: np.ndarray, conc: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    aif = np.asarray(aif, dtype=np.float64)
    conc = np.asarray(conc)
    if aif.ndim != 1 or aif.size < 8:
        raise ValueError(f"aif must be a 1-D curve of at least 8 time points, got shape {aif.shape}")
    if conc.ndim != 2 or conc.shape[0] != aif.size:
        raise ValueError(f"conc must be (t, voxels) with t = {aif.size}, got shape {conc.shape}")
    if not np.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt must be a positive time step in seconds, got {dt!r}")
    if not np.all(np.isfinite(aif)) or aif.max() <= 0:
        raise ValueError("aif must be finite with a positive peak")
    return aif, conc


@dataclass
class Deconvolution:
    """Residues ``k`` (L, voxels) scaled by CBF (1/s, in the units of conc/aif), their time step and
    the per-voxel number of singular values kept (oSVD) - a record of the regularisation used."""

    k: np.ndarray
    dt: float
    circular: bool
    n_kept: np.ndarray

    @property
    def cbf(self) -> np.ndarray:
        """CBF in 1/s (ml blood per ml tissue per second, before haematocrit and density)."""
        return np.maximum(self.k.max(axis=0), 0.0)

    def tmax(self) -> np.ndarray:
        """Time of the residue maximum in s, sub-sample refined; negative where tissue led the AIF."""
        return residue_peak_time(self.k, self.dt, self.circular)


def oscillation_index(k: np.ndarray) -> np.ndarray:
    """Wu's second-difference oscillation index per column of ``k`` (L, voxels)."""
    L = k.shape[0]
    d2 = np.abs(k[2:] - 2.0 * k[1:-1] + k[:-2]).sum(axis=0)
    peak = np.abs(k).max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        oi = d2 / (L * peak)
    return np.where(peak > 0, oi, 0.0)


def simpson_weights(aif: np.ndarray) -> np.ndarray:
    """Wu's quadrature for the convolution matrix: the AIF varies linearly between samples, which
    gives the (a[k-1] + 4 a[k] + a[k+1]) / 6 weights (the first and last samples are the ends)."""
    n = aif.size
    col = np.zeros(2 * n)
    col[0] = aif[0]
    col[1:n - 1] = (aif[:-2] + 4.0 * aif[1:-1] + aif[2:]) / 6.0
    col[n - 1] = (aif[n - 2] + 4.0 * aif[n - 1]) / 6.0
    col[n] = aif[n - 1] / 6.0
    return col


def circulant_matrix(aif: np.ndarray, dt: float) -> np.ndarray:
    """The 2N x 2N block-circulant convolution matrix of ``aif`` (zero-padded; Wu's quadrature)."""
    n = aif.size
    col = simpson_weights(aif)
    idx = (np.arange(2 * n)[:, None] - np.arange(2 * n)[None, :]) % (2 * n)
    return col[idx] * dt


def toeplitz_matrix(aif: np.ndarray, dt: float) -> np.ndarray:
    """The N x N lower-triangular convolution matrix of ``aif`` (rectangle rule)."""
    n = aif.size
    i = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.where(i >= 0, aif[np.clip(i, 0, n - 1)], 0.0) * dt


@single_threaded_blas
def osvd(aif: np.ndarray, conc: np.ndarray, dt: float, oi_threshold: float = DEFAULT_OI,
         chunk: int = 65536) -> Deconvolution:
    """Oscillation-index regularised block-circulant SVD deconvolution (Wu et al. 2003).

    ``aif`` (N,) and ``conc`` (N, voxels) in the same concentration units (e.g. Delta R2*, 1/s);
    ``dt`` the frame interval in s. Returns residues of length 2N per voxel.
    """
    aif, conc = _check_inputs(aif, conc, dt)
    if not 0 < oi_threshold < 1:
        raise ValueError(f"oi_threshold must be in (0, 1), got {oi_threshold!r}")
    n = aif.size
    L = 2 * n
    u, s, vt = np.linalg.svd(circulant_matrix(aif, dt))
    s_inv = np.where(s > s[0] * 1e-10, 1.0 / s, 0.0).astype(np.float32)
    ut = u.T.astype(np.float32)
    v = vt.T.astype(np.float32)
    nv = conc.shape[1]
    k_out = np.empty((L, nv), np.float32)
    kept = np.empty(nv, np.int16)
    order = np.arange(L)[:, None]
    for a in range(0, nv, chunk):
        c = np.zeros((L, min(chunk, nv - a)), np.float32)
        c[:n] = conc[:, a:a + chunk]
        coef = (ut @ c) * s_inv[:, None]  # solution coordinates in the V basis
        # bisection on the number of kept singular values: largest m with OI(m) <= threshold
        lo = np.ones(c.shape[1], np.int32)  # OI(1) is always tiny (one smooth component)
        hi = np.full(c.shape[1], L, np.int32)
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi + 1) // 2
            k = v @ np.where(order < mid[None, :], coef, 0.0)
            ok = oscillation_index(k) <= oi_threshold
            lo = np.where(active & ok, mid, lo)
            hi = np.where(active & ~ok, mid - 1, hi)
        k_out[:, a:a + c.shape[1]] = v @ np.where(order < lo[None, :], coef, 0.0)
        kept[a:a + c.shape[1]] = lo
    return Deconvolution(k=k_out, dt=float(dt), circular=True, n_kept=kept)


@single_threaded_blas
def ssvd(aif: np.ndarray, conc: np.ndarray, dt: float, threshold: float = SSVD_THRESHOLD) -> Deconvolution:
    """Standard truncated SVD on the Toeplitz matrix with a fixed relative threshold (baseline)."""
    aif, conc = _check_inputs(aif, conc, dt)
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    u, s, vt = np.linalg.svd(toeplitz_matrix(aif, dt))
    s_inv = np.where(s > threshold * s[0], 1.0 / s, 0.0)
    pinv = ((vt.T * s_inv) @ u.T).astype(np.float32)
    k = pinv @ conc.astype(np.float32)
    kept = np.full(conc.shape[1], int((s_inv > 0).sum()), np.int16)
    return Deconvolution(k=k, dt=float(dt), circular=False, n_kept=kept)


def residue_peak_time(k: np.ndarray, dt: float, circular: bool) -> np.ndarray:
    """argmax of each residue column with parabolic refinement, in s.

    On a circulant residue the neighbours wrap around and indices past L/2 become negative times
    (tissue ahead of the AIF); on a Toeplitz residue the edges are not refined.
    """
    L = k.shape[0]
    j = np.argmax(k, axis=0)
    cols = np.arange(k.shape[1])
    if circular:
        ym, y0, yp = k[(j - 1) % L, cols], k[j, cols], k[(j + 1) % L, cols]
        inner = np.ones_like(j, dtype=bool)
    else:
        jm, jp = np.clip(j - 1, 0, L - 1), np.clip(j + 1, 0, L - 1)
        ym, y0, yp = k[jm, cols], k[j, cols], k[jp, cols]
        inner = (j > 0) & (j < L - 1)
    den = ym - 2.0 * y0 + yp
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(inner & (den < 0), 0.5 * (ym - yp) / den, 0.0)
    pos = j + np.clip(off, -0.5, 0.5)
    if circular:
        pos = np.where(pos >= L / 2, pos - L, pos)
    return (pos * dt).astype(np.float32)
