"""DSC deconvolution on Kudo-style digital reference grids (tests/unit/dsc_reference.py).

Two settings of the phantom-model grid (TR 1.0 s at SNR 50, TR 1.6 s at SNR 100) and one of the
alternative-model grid (other AIF, dispersion and residue models) keep the test fast; bench/perfusion.py
runs every TR x SNR and records the figures in docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.perfusion import concentration, detect_bolus, osvd, ssvd, voxel_maps
from models.perfusion.deconv import oscillation_index
from models.perfusion.maps import DscOptions, smooth_in_plane
from models.perfusion.tmax_fit import fit_tmax
from tests.unit.dsc_reference import TE_S, alternative_set, delta_r2s, reference_set


def _conc(rs):
    return delta_r2s(rs.signal)


@pytest.fixture(scope="module", params=[(1.0, 50.0), (1.6, 100.0)], ids=["tr1.0-snr50", "tr1.6-snr100"])
def grid(request):
    rs = reference_set(*request.param, reps=2)
    conc = _conc(rs)
    return rs, voxel_maps(conc, rs.aif_r2s, rs.tr), voxel_maps(conc, rs.aif_r2s, rs.tr, "ssvd")


def test_model_based_tmax_is_unbiased_and_beats_the_residue_argmax_and_ssvd(grid):
    rs, o, s = grid
    err = o["tmax"] - rs.tmax
    err_res = o["tmax_residue"] - rs.tmax
    err_s = s["tmax"] - rs.tmax
    # measured: median abs error 0.38 s (TR 1.0, SNR 50) and 0.35 s (TR 1.6, SNR 100), bias -0.07/-0.02 s
    # (the best template alone, before the posterior mean: 0.57 and 0.49 s); the oSVD residue argmax is
    # 1.2-1.5 s late (its regularisation smooths the residue's rise)
    assert abs(np.median(err)) <= 0.25
    assert np.median(err_res) >= 0.8
    assert np.median(np.abs(err)) <= 0.45
    assert np.median(np.abs(err)) <= 0.6 * np.median(np.abs(err_res))
    assert np.corrcoef(o["tmax"], rs.tmax)[0, 1] >= 0.955  # measured 0.968 and 0.979 (best template: 0.945, 0.964)
    delayed = rs.delay >= 3.0
    assert np.mean(np.abs(err[delayed])) < 0.7 * np.mean(np.abs(err_s[delayed]))
    assert np.mean(np.abs(err_res[delayed])) < np.mean(np.abs(err_s[delayed]))  # oSVD itself beats sSVD there


def test_negative_delays_come_out_negative_never_with_ssvd(grid):
    rs, o, s = grid
    early = (rs.delay == -3.0) & (rs.tmax < -1.0)  # tissue leads the AIF by over a second
    assert early.sum() >= 20
    assert np.median(o["tmax"][early]) < -1.0
    assert np.median(np.abs(o["tmax"][early] - rs.tmax[early])) <= 0.8
    assert np.mean(o["tmax"][early] < 0) >= 0.8
    assert s["tmax"].min() >= 0.0  # the Toeplitz residue has no negative times


def test_tmax_fit_is_not_tied_to_the_phantom_models():
    """On curves from another AIF (Parker), gamma dispersion and linear/gamma residues the fit's shape
    family is wrong, and it must still be unbiased and clearly better than the residue argmax and sSVD."""
    rs = alternative_set(1.3, 50.0)
    conc = _conc(rs)
    o = voxel_maps(conc, rs.aif_r2s, rs.tr)
    s = voxel_maps(conc, rs.aif_r2s, rs.tr, "ssvd")
    err, err_res, err_s = (np.abs(v - rs.tmax) for v in (o["tmax"], o["tmax_residue"], s["tmax"]))
    # measured: 0.63 s vs 1.67 s (argmax) and 1.77 s (sSVD); bias +0.01 s (best template alone: 0.69 s, +0.10 s)
    assert abs(np.median(o["tmax"] - rs.tmax)) <= 0.3
    assert np.median(err) <= 0.8
    assert np.median(err) <= 0.6 * np.median(err_res)
    assert np.median(err) <= 0.6 * np.median(err_s)
    early = rs.tmax < -1.0  # measured median estimate -0.74 s
    assert np.median(o["tmax"][early]) < -0.3


def test_cbf_and_cbv_correlate_with_truth(grid):
    rs, o, _ = grid
    assert np.corrcoef(o["cbf"], rs.cbf)[0, 1] >= 0.89  # measured 0.912 and 0.910
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
    with pytest.raises(ValueError, match="tmax_method"):
        voxel_maps(np.ones((20, 3)), np.ones(20), 1.0, tmax_method="peak")
    with pytest.raises(ValueError, match="guess"):
        fit_tmax(np.ones(20), np.ones((20, 3)), 1.0, np.zeros(2))
    with pytest.raises(ValueError, match="smooth_fwhm_mm"):
        DscOptions(smooth_fwhm_mm=-1.0)


def test_in_plane_smoothing_stays_inside_its_weight_and_keeps_a_flat_image_flat():
    rng = np.random.default_rng(1)
    series = 100.0 + rng.normal(0, 5, (6, 3, 20, 20)).astype(np.float32)
    weight = np.ones((3, 20, 20), bool)
    weight[:, 8:10, 8:10] = False  # a "vessel": neither smoothed nor spread
    series[:, :, 8:10, 8:10] = 1000.0
    out = smooth_in_plane(series, weight, 6.0, (5.0, 2.0, 2.0))
    assert np.array_equal(out[:, :, 8:10, 8:10], series[:, :, 8:10, 8:10])
    assert out[:, weight].max() < 130  # the vessel's 1000 did not leak into the tissue around it
    assert out[:, weight].std() < 0.5 * series[:, weight].std()
    flat = np.full((2, 3, 20, 20), 50.0, np.float32)
    assert np.allclose(smooth_in_plane(flat, weight, 6.0, (5.0, 2.0, 2.0)), 50.0)
    # slices are not mixed
    step = np.zeros((1, 3, 20, 20), np.float32)
    step[:, 1] = 10.0
    sm = smooth_in_plane(step, np.ones((3, 20, 20), bool), 6.0, (5.0, 2.0, 2.0))
    assert np.allclose(sm[:, 0], 0.0) and np.allclose(sm[:, 1], 10.0)


def test_each_voxel_baseline_ends_at_its_own_bolus():
    """Tissue arrives with the brain-wide mean; arteries 5 frames earlier. With the brain's baseline the
    artery's last baseline frames are bolus: S0 too low and its SD many times the noise. Each voxel's
    baseline ends at its own bolus, so both come out at their truth."""
    rng = np.random.default_rng(0)
    t = np.arange(40, dtype=np.float64)
    s0_true, noise = 500.0, 5.0

    def curve(arrival: float, peak: float) -> np.ndarray:
        x = np.clip(t - arrival, 0, None)
        return peak * (x / 3.0) ** 2 * np.exp(-(x - 3.0) / 1.5) * (x > 0)  # gamma-like bolus, peak at +3 frames

    tissue = s0_true * np.exp(-TE_S * curve(12.0, 8.0))
    artery = s0_true * np.exp(-TE_S * curve(7.0, 40.0))
    sig = np.stack([tissue] * 2000 + [artery] * 3, axis=1) + rng.normal(0, noise, (t.size, 2003))
    bolus = detect_bolus(sig.mean(axis=1))
    assert bolus.arrival >= 10  # found on the brain-wide mean: frames into the arteries' bolus
    conc, s0, sd = concentration(sig, bolus, TE_S)
    art = slice(2000, 2003)
    assert np.allclose(s0[art], s0_true, atol=3 * noise)
    assert np.all(sd[art] < 2 * noise), sd[art]
    assert np.abs(conc[2:7, art]).max() < 5 * noise / s0_true / TE_S  # flat before its own bolus
    assert np.allclose(s0[:2000].mean(), s0_true, atol=1.0) and 0.7 * noise < np.median(sd[:2000]) < 1.3 * noise


def test_a_three_frame_baseline_still_ends_at_an_early_artery():
    """A short series start (the brain's baseline only 3 frames, frames 2-4; TR 1.6 s with the bolus 5 s in,
    as on randomised phantom study 500001): the artery's bolus begins on the third of them. Too few frames
    for a voxel's own spread, so the image's noise (the median voxel's) decides where its bolus starts.
    Measured: artery SD 7-16 against 130 with the brain's baseline, S0 488-492 against 413 (truth 500)."""
    rng = np.random.default_rng(0)
    t = np.arange(40, dtype=np.float64)
    s0_true, noise = 500.0, 5.0

    def curve(arrival: float, peak: float) -> np.ndarray:
        x = np.clip(t - arrival, 0, None)
        return peak * (x / 3.0) ** 2 * np.exp(-(x - 3.0) / 1.5) * (x > 0)

    tissue = s0_true * np.exp(-TE_S * curve(4.6, 8.0))
    artery = s0_true * np.exp(-TE_S * curve(2.8, 40.0))
    sig = np.stack([tissue] * 2000 + [artery] * 3, axis=1) + rng.normal(0, noise, (t.size, 2003))
    bolus = detect_bolus(sig.mean(axis=1))
    assert bolus.arrival - bolus.baseline_start == 3
    _, s0, sd = concentration(sig, bolus, TE_S)
    art = slice(2000, 2003)
    assert np.all(sd[art] < 4 * noise), sd[art]
    assert np.allclose(s0[art], s0_true, atol=3 * noise), s0[art]


def test_read_tile_by_tile_as_kudo_reads_the_phantom_model_grid_meets_the_targets():
    """Issue 17's targets on the grid built from the phantom's DSC model, read as Kudo's digital phantom
    is read: a tile of noise draws per condition, the method's smoothing, the mean over the tile's middle.
    Measured (bench/perfusion_tiles.py, pooled over TR 1.0-1.6 s and SNR 20-100): Tmax median error
    0.23 s, 95th percentile 0.73 TR, CBF r 0.921 (0.21-0.28 s, 0.65-0.89 TR, 0.916-0.922 over other tile,
    ROI and pixel sizes). Per curve (no spatial reading) the same method gives 0.47 s, 1.97 TR and
    0.895 - that reading stays in bench/perfusion.py."""
    from bench.perfusion_tiles import TILE, tiled_grid

    x = tiled_grid(lambda tr, snr: reference_set(tr, snr, reps=TILE * TILE), "phantom-model grid",
                   DscOptions().smooth_fwhm_mm)
    assert x["tiles"] == 6300
    assert x["med"] <= 0.5 and x["p95_tr"] <= 1.0 and x["r_cbf"] >= 0.9, x


def test_tiles_hold_their_own_condition():
    from bench.perfusion_tiles import tile_image

    rs = reference_set(1.0, 100.0, reps=4, delays=(0.0, 3.0), mtts=(4.0,), cbfs=(50.0,), betas=(0.5,))
    img, rows, cols = tile_image(rs, tile=2)
    assert (rows, cols) == (1, 2) and img.shape == (rs.signal.shape[0], 1, 2, 4)
    # the second tile (right half) holds the second condition's four draws, the first the first's
    assert np.allclose(np.sort(img[:, 0, :, 2:].reshape(img.shape[0], -1), axis=1),
                       np.sort(rs.signal[:, 4:8], axis=1))
    assert np.allclose(np.sort(img[:, 0, :, :2].reshape(img.shape[0], -1), axis=1),
                       np.sort(rs.signal[:, :4], axis=1))
