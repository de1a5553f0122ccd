"""DSC-PWI consistency: a plain truncated-SVD deconvolution recovers the Tmax truth."""

from __future__ import annotations

import numpy as np
import pytest

from phantom.anatomy import DEEP_GM, GM, WM
from phantom.api import make_case
from tests.conftest import small_scale


def svd_tmax(signal: np.ndarray, aif_r2: np.ndarray, te: float, tr: float, threshold: float = 0.1) -> np.ndarray:
    """Block-circulant SVD deconvolution (Wu et al. 2003 without the oscillation index): Tmax = argmax
    of the recovered residue. ``signal`` is (t, n) tissue signal."""
    base = signal[:5].mean(axis=0)
    r2 = -np.log(np.maximum(signal, 1e-3) / np.maximum(base, 1e-3)) / te
    n = len(aif_r2)
    col = np.concatenate([aif_r2, np.zeros(n)])
    a = np.stack([np.roll(col, i) for i in range(2 * n)], axis=1) * tr
    u, s, vt = np.linalg.svd(a)
    inv = (vt.T * np.where(s > threshold * s.max(), 1.0 / s, 0.0)) @ u.T
    k = inv @ np.concatenate([r2, np.zeros((n, r2.shape[1]))])
    return np.argmax(k[:n], axis=0) * tr


@pytest.mark.slow
def test_svd_recovers_tmax_within_1p5_s():
    matrix = 64 if small_scale() else 128
    c = make_case(2, matrix=matrix, with_dsc=True,
                  scenario={"occlusion": "M1", "side": "left", "collaterals": "moderate", "onset_h": 3.0})
    info = c.truth["acquisition"]["dsc"]
    assert c.dsc.shape == (info["n_frames"],) + c.grid.shape
    par = np.isin(c.tissue, (GM, WM, DEEP_GM)) & c.brain
    aif_r2 = np.asarray(info["aif_concentration_mM"]) * info["k2_per_s_per_mM"]
    est = svd_tmax(c.dsc[:, par].astype(np.float64), aif_r2, info["te_s"], info["tr_s"])
    truth = c.tmax[par]
    err = np.abs(est - truth)
    assert np.median(err) <= 1.5
    # and it is not trivially small: hypoperfused tissue is found delayed
    hyp = truth > 8
    assert hyp.sum() > 100 and np.median(est[hyp]) > 6.0
