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
delayed by ``delta``, which may be negative. For every (MTT, beta) shape on a fixed grid and every Tmax on
a 0.25 s grid the amplitude is linear, so each template's likelihood (Gaussian noise) follows from its
normalised correlation with the curve: ``SSR = |c|^2 - score^2``. Tmax, the argmax of the fitted ``k``,
is ``delta + t*(MTT, beta)``; the reported Tmax is its **posterior mean** over all templates (uniform
prior on the grid; the noise variance from the best template's residual), not the best template's Tmax.
Why: once the curve has passed through the AIF's 4-5 s wide first pass, MTT and dispersion trade
against each other and many shapes fit a noisy curve almost equally well, with Tmax values seconds
apart; the single best one follows the noise. Averaging over them weighs each by how well it fits, and
on the reference grid read per curve it cut the median error from 0.67 s (the maximum-likelihood
template with a parabola refinement, used until 2026-12) to 0.47 s and the 95th percentile from 2.5 to
1.97 TR (docs/perfusion.md). The search window is centred on the oSVD Tmax (-4 s to +2 s: oSVD is late,
never seconds early), so one matrix product per chunk of voxels covers it.

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


def _shape_tissue_curves(aif: np.ndarray, dt: float, pad_s: float, mtts: tuple[float, ...] = FIT_MTTS_S,
                         betas: tuple[float, ...] = FIT_BETAS_S) -> tuple[np.ndarray, np.ndarray, float]:
    """AIF (*) k for every shape on a fine grid (shapes, fine samples), their t*, and the fine step.

    The AIF is interpolated by a cubic spline between frames and held at its last value past the
    series (tissue that leads the AIF needs AIF values after the last frame)."""
    n = aif.size
    t = np.arange(n) * dt
    dtf = dt / SUBSAMPLE
    tf = np.arange(0.0, n * dt + pad_s, dtf)
    af = np.where(tf <= t[-1], CubicSpline(t, aif)(np.minimum(tf, t[-1])), aif[-1])
    curves, tstar = [], []
    for mtt in mtts:
        r = np.exp(-tf / mtt)
        for beta in betas:
            k = r if beta == 0 else np.convolve(np.exp(-tf / beta) / beta, r)[: tf.size] * dtf
            curves.append(np.convolve(af, k)[: tf.size] * dtf)
            tstar.append(float(residue_peak_offset(mtt, beta)))
    return np.asarray(curves), np.asarray(tstar), dtf


def posterior_mean_tmax(score: np.ndarray, best_score: np.ndarray, energy: np.ndarray, dof: int,
                        template_tmax: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Per voxel, the likelihood-weighted mean of the templates' Tmax. Overwrites ``score``.

    ``score`` (voxels, templates) holds each template's normalised correlation with the curve; with the
    amplitude kept >= 0 a template's residual is ``energy - max(score, 0)^2`` (an anticorrelated one
    fits best with amplitude 0). The noise variance comes from the best template's residual over
    ``dof`` degrees of freedom. A voxel where no template correlates keeps its best template's Tmax."""
    sig2 = np.maximum(energy - best_score ** 2, 1e-6 * energy + 1e-30) / dof
    w = np.maximum(score, 0.0, out=score)
    np.square(w, out=w)
    w -= (best_score * best_score)[:, None]
    w *= (0.5 / sig2)[:, None].astype(w.dtype)
    np.exp(w, out=w)
    total = w.sum(axis=1)
    ok = (best_score > 0) & (total > 0)
    mean = (w @ template_tmax) / np.where(ok, total, 1.0)
    return np.where(ok, mean, template_tmax[best]).astype(np.float32)


def fit_tmax(aif: np.ndarray, conc: np.ndarray, dt: float, guess: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Model-based Tmax (s) per voxel of ``conc`` (t, voxels), searched around ``guess`` (s, e.g. the
    oSVD Tmax). NaN guesses are searched around 0. Returns float32 (voxels,)."""
    return fit_residue(aif, conc, dt, guess, chunk)[0]


@single_threaded_blas
def fit_residue(aif: np.ndarray, conc: np.ndarray, dt: float, guess: np.ndarray, chunk: int = 4096,
                shapes: tuple[tuple[float, ...], tuple[float, ...]] = (FIT_MTTS_S, FIT_BETAS_S),
                ) -> tuple[np.ndarray, np.ndarray]:
    """Model-based Tmax (s) and flow (1/s, the fitted amplitude ``A``) per voxel of ``conc``.

    ``A`` is CBF in the units of the SVD residue's height: the fitted ``k`` has ``R(0) = 1`` and a
    unit-area dispersion kernel, so dispersion and delay, which lower the height of the SVD residue
    (Calamante et al., MRM 2000), do not lower ``A``. Negative amplitudes (no enhancement) are 0.

    ``chunk`` voxels are scored at a time: it bounds memory (4096 voxels x 4 000 templates, float32, is
    about 65 MB per array; the posterior needs the whole score matrix), it is not a speed setting.
    ``shapes`` (MTTs, dispersion times, s) is the template family; bench/perfusion.py narrows it to a
    reference grid's own values to measure what an estimator that knows the truth's shapes reaches."""
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
    cf, tstar, dtf = _shape_tissue_curves(aif, dt, pad, *shapes)
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
        tm = np.tile(c0 + offsets, n_shape).astype(np.float32)  # each template's Tmax, shape-major
        dof = max(n - 4, 1)  # amplitude, delay, MTT, beta
        for a in range(0, vox.size, chunk):
            v = vox[a:a + chunk]
            cv = conc[:, v].astype(np.float32)
            # (voxels, templates), C order, so the per-voxel reductions run along contiguous memory
            score = (cv.T @ basis) @ coef_t
            best = np.argmax(score, axis=1)
            s_i = best // n_off
            y0 = score[np.arange(v.size), best]
            out[v] = posterior_mean_tmax(score, y0, (cv * cv).sum(axis=0), dof, tm, best)
            seen = norm[best] >= MIN_SEEN * full_norm[s_i]
            # least squares: A = (c . m) / |m|^2; 0 where the series does not show the fitted bolus
            flow[v] = np.where(seen, np.maximum(y0, 0.0) / norm_safe[best], 0.0)
    return out, flow
