"""DSC deconvolution on a Kudo-style digital reference grid built from the phantom's DSC model.

Two settings of the grid (TR 1.0 s at SNR 50, TR 1.6 s at SNR 100) keep the test fast; bench/perfusion.py
runs the whole grid (TR 1.0-1.6 s x SNR 20-100) and records the figures in docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.perfusion import concentration, detect_bolus, osvd, ssvd, voxel_maps
from models.perfusion.deconv import oscillation_index
from tests.unit.dsc_reference import TE_S, reference_set


def _conc(rs):
    bolus = detect_bolus(rs.signal.mean(axis=1))
    return concentration(rs.signal, bolus, TE_S)[0]


@pytest.fixture(scope="module", params=[(1.0, 50.0), (1.6, 100.0)], ids=["tr1.0-snr50", "tr1.6-snr100"])
def grid(request):
    rs = reference_set(*request.param, reps=2)
    conc = _conc(rs)
    return rs, voxel_maps(conc, rs.aif_r2s, rs.tr), voxel_maps(conc, rs.aif_r2s, rs.tr, "ssvd")


def test_osvd_tmax_tracks_truth_and_beats_ssvd_on_delayed_voxels(grid):
    rs, o, s = grid
    err = np.abs(o["tmax"] - rs.tmax)
    # measured 1.25 s (TR 1.0, SNR 50) and 1.46 s (TR 1.6, SNR 100): the smoothing bias of a regularised
    # residue; the 0.5 s target is not met (docs/perfusion.md)
    assert np.median(err) <= 2.0
    assert np.corrcoef(o["tmax"], rs.tmax)[0, 1] >= 0.9
    delayed = rs.delay >= 3.0
    err_s = np.abs(s["tmax"] - rs.tmax)
    assert np.mean(err[delayed]) < np.mean(err_s[delayed])


def test_negative_delays_come_out_negative_with_osvd_never_with_ssvd(grid):
    rs, o, s = grid
    early = (rs.delay == -3.0) & (rs.mtt <= 4.0) & (rs.cbf >= 40.0) & (rs.beta < 1.0)  # truth about -2 s
    assert np.all(rs.tmax[early] < -1.0)
    assert np.median(o["tmax"][early]) < 0.0
    assert np.median(o["tmax"][early]) < np.median(o["tmax"][(rs.delay == 0.0) & (rs.mtt <= 4.0) & (rs.beta < 1.0)]) - 1.5
    assert s["tmax"].min() >= 0.0  # the Toeplitz residue has no negative times


def test_cbf_and_cbv_correlate_with_truth(grid):
    rs, o, _ = grid
    assert np.corrcoef(o["cbf"], rs.cbf)[0, 1] >= 0.88  # measured 0.91 at both settings
    assert np.corrcoef(o["cbv"], rs.cbv)[0, 1] >= 0.95  # measured 0.99
    ok = np.isfinite(o["mtt"])
    assert np.corrcoef(o["mtt"][ok], rs.mtt[ok])[0, 1] >= 0.8


def test_oscillation_index_bounds_the_residue_and_threshold_orders_regularisation():
    rs = reference_set(1.0, 50.0, reps=1, mtts=(4.0, 12.0), cbfs=(20.0, 60.0))
    conc = _conc(rs)
    loose = osvd(rs.aif_r2s, conc, rs.tr, oi_threshold=0.1)
    tight = osvd(rs.aif_r2s, conc, rs.tr, oi_threshold=0.02)
    assert np.all(oscillation_index(tight.k) <= 0.02 + 1e-6)
    assert np.all(loose.n_kept >= tight.n_kept) and np.mean(loose.n_kept) > np.mean(tight.n_kept)
    base = ssvd(rs.aif_r2s, conc, rs.tr)
    assert base.k.shape[0] == conc.shape[0] and tight.k.shape[0] == 2 * conc.shape[0]


def test_constructors_name_bad_arguments():
    with pytest.raises(ValueError, match="oi_threshold"):
        osvd(np.ones(20), np.ones((20, 3)), 1.0, oi_threshold=2.0)
    with pytest.raises(ValueError, match="conc"):
        osvd(np.ones(20), np.ones((19, 3)), 1.0)
    with pytest.raises(ValueError, match="dt"):
        ssvd(np.ones(20), np.ones((20, 3)), 0.0)
