"""Stroke phantom: determinism, truth consistency and the physiological relationships it promises."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from phantom.anatomy import DEEP_GM, GM, WM
from phantom.api import make_case, write_training_case
from phantom.signal import flair_core_ratio

TRAINING_FILES = {"dwi.nii.gz", "b0.nii.gz", "adc.nii.gz", "flair.nii.gz", "core.nii.gz", "tmax.nii.gz",
                  "brain.nii.gz", "territory.nii.gz", "truth.json"}
M1 = {"occlusion": "M1", "side": "left", "collaterals": "moderate"}


@pytest.fixture(scope="module")
def stroke_case():
    return make_case(11, scenario={**M1, "onset_h": 3.0})


def test_same_seed_gives_identical_files(tmp_path):
    a = write_training_case(make_case(5), tmp_path / "a")
    b = write_training_case(make_case(5), tmp_path / "b")
    assert a.name == "case_000005"
    for name in sorted(TRAINING_FILES):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = make_case(6)
    assert not np.array_equal(c.dwi, make_case(5).dwi)


def test_training_layout_and_types(tmp_path, stroke_case):
    d = write_training_case(stroke_case, tmp_path)
    assert TRAINING_FILES <= {p.name for p in d.iterdir()}
    truth = json.loads((d / "truth.json").read_text())
    for key in ("core_ml", "tmax6_ml", "tmax10_ml", "mismatch_ml", "mismatch_ratio", "occlusion", "side",
                "onset_h", "collaterals", "seed", "vendor"):
        assert key in truth, key
    assert truth["synthetic"] is True and truth["seed"] == 11
    dtypes = {n: nib.load(d / f"{n}.nii.gz").get_data_dtype() for n in ("core", "brain", "territory", "tmax")}
    assert dtypes["core"] == np.uint8 and dtypes["brain"] == np.uint8 and dtypes["territory"] == np.uint8
    assert dtypes["tmax"] == np.float32
    terr = np.asarray(nib.load(d / "territory.nii.gz").dataobj)
    assert set(np.unique(terr)) <= set(range(9)) and {1, 2, 3, 4, 5, 6, 7, 8} <= set(np.unique(terr))


def test_truth_volumes_are_voxel_counts_times_voxel_volume(tmp_path, stroke_case):
    d = write_training_case(stroke_case, tmp_path)
    truth = json.loads((d / "truth.json").read_text())
    img = nib.load(d / "tmax.nii.gz")
    vox_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    tmax = np.asarray(img.dataobj)
    core = np.asarray(nib.load(d / "core.nii.gz").dataobj) > 0
    brain = np.asarray(nib.load(d / "brain.nii.gz").dataobj) > 0
    assert truth["core_ml"] > 0 and truth["tmax6_ml"] > truth["core_ml"]
    assert truth["core_ml"] == pytest.approx(core.sum() * vox_ml, abs=1e-3)
    assert truth["tmax6_ml"] == pytest.approx(((tmax > 6) & brain).sum() * vox_ml, abs=1e-3)
    assert truth["tmax10_ml"] == pytest.approx(((tmax > 10) & brain).sum() * vox_ml, abs=1e-3)
    assert truth["mismatch_ml"] == pytest.approx(truth["tmax6_ml"] - truth["core_ml"], abs=2e-3)
    assert truth["mismatch_ratio"] == pytest.approx(truth["tmax6_ml"] / truth["core_ml"], rel=1e-3)


def test_core_lies_where_adc_below_620(stroke_case):
    c = stroke_case
    assert c.core.sum() > 50
    assert (c.adc[c.core] < 620).mean() > 0.95
    normal = np.isin(c.tissue, (GM, WM, DEEP_GM)) & c.brain & ~c.core
    assert ((c.adc < 620) & normal).sum() / normal.sum() < 0.01
    # core sits in the most hypoperfused tissue
    assert np.median(c.tmax[c.core]) > np.median(c.tmax[(c.tmax > 6) & ~c.core])


def test_flair_core_signal_depends_on_onset():
    early = make_case(11, scenario={**M1, "collaterals": "poor", "onset_h": 1.5})
    late = make_case(11, scenario={**M1, "collaterals": "poor", "onset_h": 9.0})
    ref = make_case(11, scenario={"occlusion": "none"})
    both = early.core & late.core
    assert both.sum() > 50
    r_early = early.flair_on_dwi[both].mean() / ref.flair_on_dwi[both].mean()
    r_late = late.flair_on_dwi[both].mean() / ref.flair_on_dwi[both].mean()
    assert r_early < 1.08  # DWI-FLAIR mismatch: core not yet FLAIR-visible
    assert r_late > 1.25
    assert flair_core_ratio(1.5) < flair_core_ratio(4.5) < flair_core_ratio(9.0)
    assert late.core.sum() > early.core.sum()  # the core grows with time


def test_fvh_inside_tmax6_and_visible(stroke_case):
    c = stroke_case
    assert c.fvh.sum() > 30
    assert (c.tmax[c.fvh] > 6).all()
    # bright against the dark CSF around them
    csf = (c.tissue == 4) & c.brain & ~c.fvh & (c.tmax > 0)
    assert np.median(c.flair_on_dwi[c.fvh]) > 3 * np.median(c.flair_on_dwi[csf])
    assert not make_case(11, scenario={"occlusion": "none"}).fvh.any()


def test_penumbral_adc_drop_is_mild(stroke_case):
    c = stroke_case
    wm = c.tissue == WM
    pen = wm & (c.tmax > 8) & ~c.core
    normal = wm & (c.tmax < 3) & (c.tmax > 0)
    ratio = np.median(c.adc[pen]) / np.median(c.adc[normal])
    assert 0.88 < ratio < 0.97


def test_hypoperfusion_is_not_the_whole_territory():
    # good collaterals shrink the Tmax > 6 s region inside the occluded territory
    good = make_case(21, scenario={**M1, "collaterals": "good", "onset_h": 2.0})
    poor = make_case(21, scenario={**M1, "collaterals": "poor", "onset_h": 2.0})
    mca = np.isin(good.territory, (3, 5))
    frac_good = ((good.tmax > 6) & mca).sum() / mca.sum()
    frac_poor = ((poor.tmax > 6) & mca).sum() / mca.sum()
    assert frac_good < 0.8 and frac_poor > frac_good
    assert poor.core.sum() > good.core.sum()


def test_no_stroke_case_is_clean():
    c = make_case(11, scenario={"occlusion": "none"})
    assert not c.core.any() and not (c.tmax > 6).any()
    assert c.truth["core_ml"] == 0 and c.truth["mismatch_ratio"] is None


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="seed"):
        make_case(-1)
    with pytest.raises(ValueError, match="matrix"):
        make_case(1, matrix=7)
    with pytest.raises(ValueError, match="occlusion"):
        make_case(1, scenario={"occlusion": "basilar"})


def test_geometry_like_a_clinical_protocol(stroke_case):
    c = stroke_case
    nz = c.grid.shape[0]
    assert 20 <= nz <= 30 and 4.0 <= c.truth["acquisition"]["dwi"]["slice_thickness_mm"] <= 6.0
    assert c.dwi.shape == c.adc.shape == c.tmax.shape == (nz, 128, 128)
    m = c.flair_motion
    assert 0 < np.abs(m["rotation_deg_xyz"]).max() <= 3.0 and 0 < np.abs(m["translation_mm"]).max() <= 4.0
    assert c.flair_grid.shape != c.grid.shape


def test_confounders_are_flair_bright_but_not_core():
    # seed 78 carries moderate WMH and an old infarct; give it an acute stroke as well
    c = make_case(78, scenario={**M1, "onset_h": 6.0})
    assert c.truth["anatomy"]["old_infarct"] is not None and c.truth["anatomy"]["wmh_grade"] >= 2
    wm = (c.tissue == WM) & (c.confounders == 0) & (c.tmax < 4) & c.brain
    ref = np.median(c.flair_on_dwi[wm])
    for code in (1, 2):  # WMH, gliotic rim
        m = (c.confounders == code) & ~c.core
        assert m.sum() > 20
        assert np.median(c.flair_on_dwi[m]) > 1.3 * ref
        assert np.median(c.adc[m]) > 900  # raised, not restricted
        assert (c.adc[m] < 620).mean() < 0.02
    assert not (c.core & (c.confounders >= 2)).any()


def test_penumbral_cue_pinned_changes_only_hypoperfused_dwi_and_adc():
    """``penumbral_scale`` (``synthperf phantom --penumbral-cue``) removes the penumbral ADC decline and
    its DWI rise and nothing else: the set that shows what a model takes from that cue (session 18)."""
    kw = {"matrix": 64, "randomise": True, "scenario": {**M1, "onset_h": 2.0}}
    off, full = make_case(21, penumbral_scale=0.0, **kw), make_case(21, penumbral_scale=1.0, **kw)
    for name in ("flair_on_dwi", "tmax", "core", "brain"):
        assert np.array_equal(getattr(off, name), getattr(full, name)), name
    wm = (full.tissue == WM) & ~full.core
    pen, normal = wm & (full.tmax > 8), wm & (full.tmax < 3) & (full.tmax > 0)
    assert pen.sum() > 50 and normal.sum() > 50
    rise = np.median(full.dwi[pen] / np.maximum(off.dwi[pen], 1e-3))
    assert 1.03 < rise < 1.09  # the ~5 % DWI rise a model could key on
    assert abs(np.median(full.dwi[normal] / np.maximum(off.dwi[normal], 1e-3)) - 1) < 0.002
    assert off.truth["domain"]["penumbral_scale"] == 0.0
    with pytest.raises(ValueError, match="penumbral_scale"):
        make_case(21, matrix=64, penumbral_scale=0.0)  # only with randomise


def test_grey_contrast_pinned_stretches_cortex_in_dwi_and_flair_only():
    """``grey_contrast`` (``synthperf phantom --grey-contrast``) scales the grey-minus-white signal of b0
    and FLAIR and leaves anatomy, lesion and ADC alone: the stress set for the healthy-cortex failure."""
    kw = {"matrix": 64, "randomise": True, "scenario": {"occlusion": "none"}}
    base, pinned1, hi = make_case(33, **kw), make_case(33, grey_contrast=1.0, **kw), make_case(33, grey_contrast=1.8, **kw)
    assert np.array_equal(base.dwi, pinned1.dwi) and np.array_equal(base.flair_on_dwi, pinned1.flair_on_dwi)
    for name in ("tissue", "tmax", "core", "brain"):
        assert np.array_equal(getattr(base, name), getattr(hi, name)), name
    gm, wm = (base.tissue == GM) & base.brain, (base.tissue == WM) & base.brain
    # ADC is measured from the noisy b0 and DWI, so it moves with them, but not its level
    assert abs(np.median(hi.adc[gm]) / np.median(base.adc[gm]) - 1) < 0.02
    d0, d1 = base.truth["domain"], hi.truth["domain"]
    assert d0["grey_contrast"] == 1.0 and d1["grey_contrast"] == 1.8
    for seq in ("s0", "flair"):  # recorded ratio: 1 + k (r - 1)
        assert d1["gm_wm_ratio"][seq] - 1 == pytest.approx(1.8 * (d0["gm_wm_ratio"][seq] - 1), abs=1e-3)
    assert d1["gm_wm_ratio"]["t1"] == d0["gm_wm_ratio"]["t1"]
    for img, seq in (("dwi", "s0"), ("flair_on_dwi", "flair")):
        a, b = getattr(base, img), getattr(hi, img)
        # white matter keeps its signal; cortex moves by (k - 1)(1 - 1/r) of it, less partial volume
        expected = 0.8 * (1 - 1 / d0["gm_wm_ratio"][seq])
        change = np.median(b[gm] / np.maximum(a[gm], 1e-3)) - 1
        assert abs(np.median(b[wm] / np.maximum(a[wm], 1e-3)) - 1) < 0.01, img
        assert np.sign(change) == np.sign(expected) and abs(change) >= 0.4 * abs(expected), img
    with pytest.raises(ValueError, match="grey_contrast"):
        make_case(33, matrix=64, grey_contrast=1.5)  # only with randomise


def test_acquisition_pins_change_what_they_pin_and_nothing_else():
    """``acquisition`` (``synthperf phantom --pin-acq KEY=VALUE``) overrides acquisition draws for a stress
    set beyond the drawn ranges: the anatomy, the lesion and the other sequence stay as drawn."""
    kw = {"matrix": 64, "randomise": True, "scenario": {"occlusion": "none"}}
    base = make_case(33, **kw)
    biased = make_case(33, acquisition={"dwi_bias": 0.6}, **kw)  # drawn here: 0.12
    noisy = make_case(33, acquisition={"dwi_snr": 7.0, "flair_snr": 6.0}, **kw)  # drawn: 57.6 and more
    for name in ("tissue", "tmax", "core", "brain"):
        assert np.array_equal(getattr(base, name), getattr(biased, name)), name
    assert np.array_equal(base.flair_on_dwi, biased.flair_on_dwi) and not np.array_equal(base.dwi, biased.dwi)
    # the same field pattern, stronger: measured 0.77-1.05 (5th-95th percentile) of the drawn DWI in the brain
    ratio = biased.dwi[base.brain] / np.maximum(base.dwi[base.brain], 1e-3)
    assert np.percentile(ratio, 95) - np.percentile(ratio, 5) > 0.15
    assert biased.truth["domain"]["dwi_bias"] == 0.6 and biased.truth["domain"]["acq_pinned"] == ["dwi_bias"]
    assert base.truth["domain"]["acq_pinned"] == [] and base.truth["domain"]["dwi_bias"] != 0.6
    wm = (base.tissue == WM) & base.brain
    for img in ("dwi", "flair_on_dwi"):  # measured 6.6x (DWI) and 6.0x (FLAIR) the drawn noise
        a, b = getattr(base, img), getattr(noisy, img)
        noise = [np.std((x - ndimage.median_filter(x, size=(1, 3, 3)))[wm]) for x in (a, b)]
        assert noise[1] > 3 * noise[0], img
    assert (noisy.truth["acquisition"]["dwi"]["snr_b0_wm"], noisy.truth["acquisition"]["flair"]["snr_wm"]) == (7.0, 6.0)
    for bad in ({"dwi_bais": 0.6}, {"dwi_bias": 2.0}, {"dwi_snr": "low"}, {}):
        with pytest.raises(ValueError, match="acquisition"):
            make_case(33, acquisition=bad, **kw)
    with pytest.raises(ValueError, match="acquisition: needs randomise"):
        make_case(33, matrix=64, acquisition={"dwi_bias": 0.6})


def test_texture_pinned_reads_what_was_asked_and_leaves_truth_and_other_draws_alone(tmp_path, capsys):
    """``texture`` (``synthperf phantom --texture PCT``): voxel-scale anatomy a real EPI has (4.2 % of the
    signal, bench.noise_texture) and the phantom lacks (0.1-0.4 %). Near noise-free, the b0's 3 x 3 median
    residual reads about the asked share; truth, the noise draw and an unpinned case stay as they were."""
    from cli.main import main
    from phantom.randomise import median_residual_sd

    # seed 44 draws a sharp DWI and FLAIR (blur 0.34 / 0.36 px); a blurrier draw reads less (TEXTURE_MAX_AMPLITUDE)
    kw = {"matrix": 64, "randomise": True, "acquisition": {"dwi_snr": 500.0, "flair_snr": 500.0}}
    base, zero, rough = make_case(44, **kw), make_case(44, texture=0.0, **kw), make_case(44, texture=4.0, **kw)
    assert np.array_equal(base.dwi, zero.dwi) and np.array_equal(base.flair_on_dwi, zero.flair_on_dwi)
    assert "texture_pct" not in base.truth["domain"] and rough.truth["domain"]["texture_pct"] == 4.0
    for name in ("tissue", "tmax", "core", "brain"):
        assert np.array_equal(getattr(base, name), getattr(rough, name)), name
    region = ndimage.binary_erosion(base.brain, iterations=2)

    def reads(case, img):  # % of the signal
        a = getattr(case, img).astype(np.float32)
        return 100 * median_residual_sd(a, case.brain) / float(np.median(a[region]))

    for img in ("b0", "flair_on_dwi"):
        assert reads(base, img) < 1.5 and 2.5 < reads(rough, img) < 6.5, (img, reads(base, img), reads(rough, img))
    assert median_residual_sd(rough.adc, rough.brain) > 3 * median_residual_sd(base.adc, base.brain)
    away = ~ndimage.binary_dilation(base.brain, iterations=3)  # beyond the blur's reach of the brain
    assert np.allclose(rough.dwi[away], base.dwi[away], rtol=0, atol=1e-4)  # the blur's float rounding only
    with pytest.raises(ValueError, match="texture"):
        make_case(44, matrix=64, texture=4.0)
    with pytest.raises(ValueError, match="texture"):
        make_case(44, texture=11.0, **kw)
    assert main(["phantom", "--out", str(tmp_path), "--texture", "4"]) == 2
    assert "--texture" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_pin_acq_option_parses_and_names_bad_input(tmp_path, capsys):
    from cli.cmd_phantom import parse_acquisition_pins
    from cli.main import main

    assert parse_acquisition_pins(["dwi_bias=0.6", "flair_snr = 6"]) == {"dwi_bias": 0.6, "flair_snr": 6.0}
    for item, words in (("dwi_bias", "not KEY=NUMBER"), ("dwi_bias=x", "not KEY=NUMBER"), ("tilt=3", "unknown key")):
        assert main(["phantom", "--out", str(tmp_path), "--randomise", "--pin-acq", item]) == 2
        assert "--pin-acq" in (err := capsys.readouterr().err) and words in err, err
    assert main(["phantom", "--out", str(tmp_path), "--pin-acq", "dwi_bias=0.6"]) == 2
    assert "needs randomise" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before a case is written


def test_grey_contrast_in_one_sequence_leaves_the_other_as_drawn():
    """``grey_contrast_in`` (``--grey-contrast-in``) stretches the DWI (its b0) or the FLAIR alone, to tell
    which one a model reads; the other sequence's images and recorded ratio stay as drawn."""
    kw = {"matrix": 64, "randomise": True, "scenario": {"occlusion": "none"}}
    base = make_case(33, **kw)
    dwi_only, flair_only = (make_case(33, grey_contrast=2.0, grey_contrast_in=s, **kw) for s in ("dwi", "flair"))
    gm = (base.tissue == GM) & base.brain
    assert np.array_equal(dwi_only.flair_on_dwi, base.flair_on_dwi) and not np.array_equal(dwi_only.dwi, base.dwi)
    assert np.array_equal(flair_only.dwi, base.dwi) and not np.array_equal(flair_only.flair_on_dwi, base.flair_on_dwi)
    assert np.median(dwi_only.dwi[gm]) != pytest.approx(np.median(base.dwi[gm]), rel=0.02)
    d0, dd, df = base.truth["domain"], dwi_only.truth["domain"], flair_only.truth["domain"]
    assert (d0["grey_contrast_in"], dd["grey_contrast_in"], df["grey_contrast_in"]) == ("both", "dwi", "flair")
    assert dd["gm_wm_ratio"]["flair"] == d0["gm_wm_ratio"]["flair"] != df["gm_wm_ratio"]["flair"]
    assert df["gm_wm_ratio"]["s0"] == d0["gm_wm_ratio"]["s0"] != dd["gm_wm_ratio"]["s0"]
    with pytest.raises(ValueError, match="grey_contrast_in"):
        make_case(33, grey_contrast=2.0, grey_contrast_in="t1", **kw)
    with pytest.raises(ValueError, match="grey_contrast_in"):
        make_case(33, grey_contrast_in="dwi", **kw)  # nothing to stretch
