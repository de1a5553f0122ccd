"""Tmax by fitting a delayed, dispersed residue to each tissue curve (model-based Tmax).

Why not the argmax of the oSVD residue: truncating the SVD is a zero-phase low-pass on the residue
(the block-circulant matrix's singular vectors are Fourier modes), and low-passing a residue that rises
within a second and decays over the MTT moves its maximum towards the slow side. On the reference grid
(docs/perfusion.md) that makes oSVD's Tmax 1-2 s late whatever the oscillation threshold; less
regularisation trades the bias for noise. The argmax of a regularised residue cannot be unbiased.

Instead each curve is fitted by ``C(t) = A * (AIF (*) k)(t)`` with the effective residue
``k(tau) = [h_beta (*) R_MTT](tau - delta)``: an exponential transit residue ``R = exp(-tau/MTT)``
(Østergaard et al., MRM 1996) dispersed by an exponential vascular transport function
``h = exp(-tau/beta)/beta`` (Calamante et al., MRM 2000;44:466; Østergaard et al., JCBFM 1999) and
delayed by ``delta``, which may be negative. The fit is a maximum-likelihood grid search (Gaussian
noise): for every (MTT, beta) shape on a fixed grid and every Tmax on a 0.25 s grid the amplitude is
linear, so the best template is the one with the largest normalised correlation; Tmax, the argmax of
the fitted ``k``, is ``delta + t*(MTT, beta)`` and is refined by a parabola through the scores of the
neighbouring Tmax steps of the best shape. The search window is centred on the oSVD Tmax (-4 s to
+2 s: oSVD is late, never seconds early), so one matrix product per chunk of voxels covers it.

The shape family is a model: curves from other residues (linear, gamma-distributed transit times) or
other dispersion kernels fit it with some mismatch. tests/unit/test_perfusion_reference.py checks it on
a second grid built from different AIF, residue and dispersion models, where it still beats the oSVD
argmax by about half.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import CubicSpline

from models.perfusion.deconv import single_threaded_blas

FIT_MTTS_S = tuple(float(v) for v in np.round(np.geomspace(1.5, 30.0, 16), 3))
FIT_BETAS_S = (0.0,) + tuple(float(v) for v in np.round(np.geomspace(0.2, 4.0, 9), 3))
WINDOW_S = (-4.0, 2.0)
STEP_S = 0.25
SUBSAMPLE = 10
GROUP_S = 1.0
RANK_TOL = 1e-3
#: the fitted template must keep this fraction of its norm inside the series for its amplitude to count
MIN_SEEN = 0.5


def residue_peak_offset(mtt: np.ndarray | float, beta: np.ndarray | float) -> np.ndarray:
    """t*: argmax of exp(-t/MTT) convolved with exp(-t/beta)/beta (0 without dispersion)."""
    mtt = np.asarray(mtt, np.float64)
    beta = np.asarray(beta, np.float64)
    b = np.maximum(beta, 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.log(mtt / b) * mtt * b / (mtt - b)
    t = np.where(np.isclose(mtt, b), mtt, t)
    return np.where(beta <= 0, 0.0, t)


def _shape_tissue_curves(aif: np.ndarray, dt: float, pad_s: float) -> tuple[np.ndarray, np.ndarray, float]:
    """AIF (*) k for every shape on a fine grid (shapes, fine samples), their t*, and the fine step.

    The AIF is interpolated by a cubic spline between frames and held at its last value past the
    series (tissue that leads the AIF needs AIF values after the last frame)."""
    n = aif.size
    t = np.arange(n) * dt
    dtf = dt / SUBSAMPLE
    tf = np.arange(0.0, n * dt + pad_s, dtf)
    af = np.where(tf <= t[-1], CubicSpline(t, aif)(np.minimum(tf, t[-1])), aif[-1])
    curves, tstar = [], []
    for mtt in FIT_MTTS_S:
        r = np.exp(-tf / mtt)
        for beta in FIT_BETAS_S:
            k = r if beta == 0 else np.convolve(np.exp(-tf / beta) / beta, r)[: tf.size] * dtf
            curves.append(np.convolve(af, k)[: tf.size] * dtf)
            tstar.append(float(residue_peak_offset(mtt, beta)))
    return np.asarray(curves), np.asarray(tstar), dtf


def fit_tmax(aif: np.ndarray, conc: np.ndarray, dt: float, guess: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Model-based Tmax (s) per voxel of ``conc`` (t, voxels), searched around ``guess`` (s, e.g. the
    oSVD Tmax). NaN guesses are searched around 0. Returns float32 (voxels,)."""
    return fit_residue(aif, conc, dt, guess, chunk)[0]


@single_threaded_blas
def fit_residue(aif: np.ndarray, conc: np.ndarray, dt: float, guess: np.ndarray,
                chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Model-based Tmax (s) and flow (1/s, the fitted amplitude ``A``) per voxel of ``conc``.

    ``A`` is CBF in the units of the SVD residue's height: the fitted ``k`` has ``R(0) = 1`` and a
    unit-area dispersion kernel, so dispersion and delay, which lower the height of the SVD residue
    (Calamante et al., MRM 2000), do not lower ``A``. Negative amplitudes (no enhancement) are 0."""
    aif = np.asarray(aif, np.float64)
    conc = np.asarray(conc)
    guess = np.asarray(guess, np.float64)
    if conc.ndim != 2 or conc.shape[0] != aif.size:
        raise ValueError(f"conc must be (t, voxels) with t = {aif.size}, got shape {conc.shape}")
    if guess.shape != (conc.shape[1],):
        raise ValueError(f"guess must hold one Tmax per voxel ({conc.shape[1]}), got shape {guess.shape}")
    n = aif.size
    t = np.arange(n) * dt
    g = np.where(np.isfinite(guess), guess, 0.0)
    centre = np.round(g / GROUP_S) * GROUP_S
    offsets = np.arange(WINDOW_S[0] - GROUP_S / 2, WINDOW_S[1] + GROUP_S / 2 + 1e-9, STEP_S)
    pad = max(0.0, -float(centre.min()) - WINDOW_S[0] + GROUP_S) + dt
    cf, tstar, dtf = _shape_tissue_curves(aif, dt, pad)
    n_shape, n_off = cf.shape[0], offsets.size
    out = np.empty(conc.shape[1], np.float32)
    flow = np.empty(conc.shape[1], np.float32)
    # each shape's norm over the series when it starts with the AIF: a template delayed so far that
    # most of it lies past the last frame has a small norm, and its amplitude is noise divided by it
    full_norm = np.sqrt((cf[:, ::SUBSAMPLE][:, :n] ** 2).sum(axis=1))
    for c0 in np.unique(centre):
        vox = np.nonzero(centre == c0)[0]
        # template (shape s, offset o): the shape's curve delayed so that its Tmax is c0 + o
        delta = (c0 + offsets)[None, :] - tstar[:, None]  # (shapes, offsets)
        x = (t[None, None, :] - delta[:, :, None]) / dtf
        i0 = np.floor(x).astype(np.int64)
        w = x - i0
        shp = np.arange(n_shape)[:, None, None]
        last = cf.shape[1] - 1
        v0 = np.where(i0 < 0, 0.0, cf[shp, np.clip(i0, 0, last)])
        v1 = np.where(i0 + 1 < 0, 0.0, cf[shp, np.clip(i0 + 1, 0, last)])
        m = ((1 - w) * v0 + w * v1).reshape(n_shape * n_off, n)
        norm = np.sqrt((m * m).sum(axis=1))
        norm_safe = np.maximum(norm, 1e-30)
        mn = m / norm_safe[:, None]
        # the templates span few dimensions of the n-frame space: score through the leading
        # eigenvectors of their Gram matrix (the part below RANK_TOL of the largest singular value is
        # dropped), which makes the product a fraction of the full one
        ev, vec = np.linalg.eigh(mn.T @ mn)
        keep = ev > (RANK_TOL ** 2) * ev.max()
        basis = vec[:, keep].astype(np.float32)  # (n, r)
        coef_t = (mn @ vec[:, keep]).T.astype(np.float32)  # (r, templates)
        for a in range(0, vox.size, chunk):
            v = vox[a:a + chunk]
            # (voxels, templates), C order, so the per-voxel argmax runs along contiguous memory
            score = (conc[:, v].astype(np.float32).T @ basis) @ coef_t
            best = np.argmax(score, axis=1)
            s_i, o_i = np.divmod(best, n_off)
            rows = np.arange(v.size)
            y0 = score[rows, best]
            ym = score[rows, s_i * n_off + np.clip(o_i - 1, 0, n_off - 1)]
            yp = score[rows, s_i * n_off + np.clip(o_i + 1, 0, n_off - 1)]
            den = ym - 2.0 * y0 + yp
            inner = (o_i > 0) & (o_i < n_off - 1) & (den < 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                off = np.where(inner, 0.5 * (ym - yp) / den, 0.0)
            out[v] = c0 + offsets[o_i] + np.clip(off, -0.5, 0.5) * STEP_S
            seen = norm[best] >= MIN_SEEN * full_norm[s_i]
            # least squares: A = (c . m) / |m|^2; 0 where the series does not show the fitted bolus
            flow[v] = np.where(seen, np.maximum(y0, 0.0) / norm_safe[best], 0.0)
    return out, flow
