"""Clinical measures against hand-computed volumes, flags, side and the DWI-FLAIR indicator.

Grids use 10 mm voxels (1 mL each) so every expected volume below is a count worked out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.config import load_settings
from common.errors import InvalidInputError
from worker.pipeline.measure import MeasureThresholds, compute_measures

SHAPE = (10, 20, 20)  # z, y, x
ML = 1.0
SPACING = (10.0, 10.0, 10.0)


def box(z: slice, y: slice, x: slice) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[z, y, x] = True
    return m


@pytest.fixture
def brain() -> np.ndarray:
    return np.ones(SHAPE, bool)


def tmax_with(regions: list[tuple[np.ndarray, float]]) -> np.ndarray:
    t = np.full(SHAPE, 1.0, np.float32)
    for region, value in regions:
        t[region] = value
    return t


# Core: 2 x 3 x 5 = 30 voxels at high x (patient left, identity direction).
CORE = box(slice(4, 6), slice(5, 8), slice(13, 18))
# Tmax > 6: 4 x 5 x 5 = 100 voxels (contains the core); Tmax > 10 within: 2 x 5 x 5 = 50 voxels.
HYPO = box(slice(3, 7), slice(4, 9), slice(13, 18))
SEVERE = box(slice(4, 6), slice(4, 9), slice(13, 18))


def test_typical_target_mismatch(brain: np.ndarray) -> None:
    tmax = tmax_with([(HYPO, 7.0), (SEVERE, 12.0)])
    m = compute_measures(CORE, tmax, brain, ML, spacing_zyx=SPACING)
    assert (m.core_ml, m.tmax6_ml, m.tmax10_ml) == (30.0, 100.0, 50.0)
    assert m.mismatch_ml == 70.0
    assert m.mismatch_ratio == pytest.approx(100 / 30)
    assert m.hir == pytest.approx(0.5)
    assert m.defuse3 and m.extend
    assert m.side == "left"
    assert m.flair_ratio is None and m.dwi_flair_mismatch is None
    d = m.to_dict()
    assert set(d) == {
        "core_ml", "tmax6_ml", "tmax10_ml", "mismatch_ml", "mismatch_ratio", "hir", "defuse3", "extend",
        "side", "flair_ratio", "dwi_flair_mismatch",
    }


def test_no_core_ratio_undefined_no_division(brain: np.ndarray) -> None:
    tmax = tmax_with([(HYPO, 8.0)])
    with np.errstate(all="raise"):  # any float division by zero would raise here
        m = compute_measures(np.zeros(SHAPE, bool), tmax, brain, ML)
    assert m.core_ml == 0.0 and m.tmax6_ml == 100.0 and m.tmax10_ml == 0.0
    assert m.mismatch_ratio is None
    assert m.mismatch_ml == 100.0 and m.hir == 0.0
    # Unbounded ratio: a zero core with 100 mL Tmax>6 s meets the ratio criteria.
    assert m.defuse3 and m.extend
    assert m.side == "left"  # from the hypoperfused region when there is no core


def test_nothing_at_all(brain: np.ndarray) -> None:
    with np.errstate(all="raise"):
        m = compute_measures(np.zeros(SHAPE, bool), tmax_with([]), brain, ML)
    assert m.to_dict() == {
        "core_ml": 0.0, "tmax6_ml": 0.0, "tmax10_ml": 0.0, "mismatch_ml": 0.0, "mismatch_ratio": None,
        "hir": None, "defuse3": False, "extend": False, "side": "none", "flair_ratio": None,
        "dwi_flair_mismatch": None,
    }


def test_no_hypoperfusion(brain: np.ndarray) -> None:
    with np.errstate(all="raise"):
        m = compute_measures(CORE, tmax_with([]), brain, ML)
    assert m.core_ml == 30.0 and m.tmax6_ml == 0.0
    assert m.mismatch_ml == 0.0 and m.mismatch_ratio == 0.0 and m.hir is None
    assert not m.defuse3 and not m.extend


def test_core_larger_than_hypoperfusion(brain: np.ndarray) -> None:
    big_core = box(slice(2, 8), slice(2, 10), slice(12, 17))  # 6 * 8 * 5 = 240
    tmax = tmax_with([(SEVERE, 11.0)])  # 50 mL, all > 10 s
    m = compute_measures(big_core, tmax, brain, ML)
    assert m.core_ml == 240.0 and m.tmax6_ml == 50.0 and m.tmax10_ml == 50.0
    assert m.mismatch_ml == 0.0  # volume difference, floored at 0
    assert m.mismatch_ratio == pytest.approx(50 / 240)
    assert m.hir == 1.0
    assert not m.defuse3 and not m.extend


def test_boundaries_are_the_trial_ones(brain: np.ndarray) -> None:
    core = box(slice(0, 1), slice(0, 10), slice(10, 20))  # 100 mL: > 70, fails both
    tmax = tmax_with([(box(slice(0, 5), slice(0, 20), slice(10, 20)), 9.0)])  # 1000 mL
    m = compute_measures(core, tmax, brain, ML)
    assert m.mismatch_ratio == 10.0 and not m.defuse3 and not m.extend
    # core exactly 70 mL is not < 70
    core70 = box(slice(0, 1), slice(0, 7), slice(10, 20))
    assert not compute_measures(core70, tmax, brain, ML).defuse3
    # ratio exactly 1.8 and mismatch exactly 16 mL: DEFUSE-3 yes (>=)
    core20 = box(slice(0, 1), slice(0, 2), slice(10, 20))  # 20
    hypo36 = core20 | box(slice(1, 2), slice(0, 2), slice(10, 18))  # 20 + 16 = 36
    m = compute_measures(core20, tmax_with([(hypo36, 8.0)]), brain, ML)
    assert m.mismatch_ratio == pytest.approx(1.8) and m.mismatch_ml == 16.0 and m.defuse3
    # mismatch exactly 15 mL passes DEFUSE-3 (>=), exactly 10 mL fails EXTEND (>)
    core10 = box(slice(0, 1), slice(0, 1), slice(10, 20))  # 10
    hypo25 = core10 | box(slice(1, 2), slice(0, 1), slice(5, 20))  # 10 + 15
    m = compute_measures(core10, tmax_with([(hypo25, 8.0)]), brain, ML)
    assert m.mismatch_ml == 15.0 and m.defuse3 and m.extend
    hypo20 = core10 | box(slice(1, 2), slice(0, 1), slice(10, 20))  # 10 + 10, ratio 2.0
    m = compute_measures(core10, tmax_with([(hypo20, 8.0)]), brain, ML)
    assert m.mismatch_ml == 10.0 and not m.extend and not m.defuse3
    # EXTEND ratio must exceed 1.2: 50 core, 60 hypo -> ratio 1.2, mismatch 10 -> no
    core50 = box(slice(0, 1), slice(0, 5), slice(10, 20))
    hypo60 = core50 | box(slice(1, 2), slice(0, 1), slice(10, 20))
    m = compute_measures(core50, tmax_with([(hypo60, 8.0)]), brain, ML)
    assert m.mismatch_ratio == pytest.approx(1.2) and not m.extend


def test_tmax_strict_threshold_nan_and_outside_brain() -> None:
    brain = np.zeros(SHAPE, bool)
    brain[:, :, :15] = True
    t = np.full(SHAPE, 1.0, np.float32)
    t[0, 0, 0:5] = 6.0  # exactly 6 s: not > 6
    t[1, 0, 0:5] = 10.0  # > 6, not > 10
    t[2, 0, 0:3] = np.nan  # unknown: not counted
    t[3, 0, 10:20] = 20.0  # 5 voxels inside the brain, 5 outside
    m = compute_measures(np.zeros(SHAPE, bool), t, brain, ML)
    assert m.tmax6_ml == 10.0 and m.tmax10_ml == 5.0


def test_non_cubic_voxels() -> None:
    spacing = (5.0, 0.9, 0.9)
    voxel_ml = 5.0 * 0.9 * 0.9 / 1000.0
    core = box(slice(0, 10), slice(0, 10), slice(0, 10))  # 1000 voxels
    m = compute_measures(core, tmax_with([]), np.ones(SHAPE, bool), voxel_ml, spacing_zyx=spacing)
    assert m.core_ml == pytest.approx(4.05)
    with pytest.raises(InvalidInputError, match="disagrees with spacing"):
        compute_measures(core, tmax_with([]), np.ones(SHAPE, bool), 1.0, spacing_zyx=spacing)


def test_side_follows_the_direction(brain: np.ndarray) -> None:
    tmax = tmax_with([])
    assert compute_measures(CORE, tmax, brain, ML).side == "left"
    flipped = np.diag([-1.0, 1.0, 1.0])  # x index runs to patient right
    assert compute_measures(CORE, tmax, brain, ML, direction=flipped).side == "right"
    mirror = CORE[:, :, ::-1]
    assert compute_measures(mirror, tmax, brain, ML).side == "right"
    # Sagittal grid: the z index (array axis 0) runs to patient left.
    sagittal = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)
    upper = box(slice(7, 9), slice(0, 3), slice(0, 3))
    assert compute_measures(upper, tmax, brain, ML, direction=sagittal).side == "left"
    assert compute_measures(upper[::-1], tmax, brain, ML, direction=sagittal).side == "right"


def test_side_uses_brain_midline_not_array_centre() -> None:
    brain = np.zeros(SHAPE, bool)
    brain[:, :, 0:10] = True  # brain occupies x 0..9, midline 4.5
    core = box(slice(4, 5), slice(5, 8), slice(6, 9))  # x 6..8: left of this brain's midline
    assert compute_measures(core, tmax_with([]), brain, ML).side == "left"


@pytest.mark.parametrize(("lesion_flair", "expected"), [(105.0, True), (114.0, True), (116.0, False), (160.0, False)])
def test_dwi_flair_mismatch(brain: np.ndarray, lesion_flair: float, expected: bool) -> None:
    flair = np.full(SHAPE, 100.0, np.float32)
    flair[CORE] = lesion_flair
    flair[CORE[:, :, ::-1]] = 100.0  # the mirror region (x 2..6) is normal
    m = compute_measures(CORE, tmax_with([]), brain, ML, flair=flair)
    assert m.flair_ratio == pytest.approx(lesion_flair / 100.0)
    assert m.dwi_flair_mismatch is expected


def test_flair_ratio_uses_the_mirrored_region(brain: np.ndarray) -> None:
    flair = np.full(SHAPE, 100.0, np.float32)
    flair[CORE] = 150.0
    flair[CORE[:, :, ::-1]] = 125.0  # only the mirror counts as reference
    m = compute_measures(CORE, tmax_with([]), brain, ML, flair=flair)
    assert m.flair_ratio == pytest.approx(150.0 / 125.0)
    assert m.dwi_flair_mismatch is False


def test_thresholds_come_from_settings(brain: np.ndarray) -> None:
    s = load_settings(tmax_hypoperfusion_s=5.0, tmax_severe_s=8.0, defuse3_ratio_min=4.0, extend_mismatch_min_ml=80,
                      flair_mismatch_ratio_max=1.3)
    t = MeasureThresholds.from_settings(s)
    assert (t.tmax_hypoperfusion_s, t.tmax_severe_s, t.defuse3_ratio_min, t.flair_mismatch_ratio_max) == (5.0, 8.0, 4.0, 1.3)
    assert t.defuse3_core_max_ml == 70.0 and t.extend_mismatch_min_ml == 80.0
    tmax = tmax_with([(HYPO, 5.5), (SEVERE, 9.0)])
    m = compute_measures(CORE, tmax, brain, ML, thresholds=t)
    assert (m.tmax6_ml, m.tmax10_ml) == (100.0, 50.0)
    assert not m.defuse3  # ratio 3.33 < 4
    assert not m.extend  # mismatch 70 not > 80
    dflt = compute_measures(CORE, tmax, brain, ML)  # defaults: only the 9 s voxels count as > 6, none > 10
    assert (dflt.tmax6_ml, dflt.tmax10_ml) == (50.0, 0.0)


def test_bad_arguments_named(brain: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match="tmax has shape"):
        compute_measures(CORE, np.zeros((2, 2, 2)), brain, ML)
    with pytest.raises(InvalidInputError, match="voxel_ml"):
        compute_measures(CORE, tmax_with([]), brain, 0.0)
    with pytest.raises(ValueError, match="tmax_severe_s"):
        MeasureThresholds(tmax_severe_s=4.0)
    with pytest.raises(ValueError, match="defuse3_ratio_min"):
        MeasureThresholds(defuse3_ratio_min=-1.0)


def test_flair_ratio_robust_to_a_few_bright_vessels(brain: np.ndarray) -> None:
    flair = np.full(SHAPE, 100.0, np.float32)
    flair[CORE] = 104.0
    idx = np.argwhere(CORE)[:4]  # 4 of 30 core voxels hold a very bright vessel (FVH)
    flair[tuple(idx.T)] = 400.0
    m = compute_measures(CORE, tmax_with([]), brain, ML, flair=flair)
    assert m.flair_ratio == pytest.approx(1.04)
    assert m.dwi_flair_mismatch is True
