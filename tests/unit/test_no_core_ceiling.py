"""bench.no_core_ceiling's oracle: the territories of the true vessel signs, scored against the true Tmax>6 s."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bench.no_core_ceiling import (
    best_threshold_accuracy,
    defuse3_bounds,
    evidence_lines,
    fvh_territory_oracle,
    needed_no_core_share,
    sign_contrast,
    sign_reach,
)


def _case(root: Path, fvh_at: tuple[int | slice, ...] | None) -> Path:
    d = root / ("sign" if fvh_at else "none")
    d.mkdir()
    shape = (4, 10, 10)  # (z, y, x)
    territory = np.zeros(shape, np.float32)
    territory[:, :, :5], territory[:, :, 5:] = 1, 2
    tmax = np.where(territory == 2, 9.0, 2.0).astype(np.float32)
    tmax[:, :5, 5:] = 2.0  # half of territory 2 is hypoperfused
    fvh = np.zeros(shape, np.float32)
    if fvh_at:
        fvh[fvh_at] = 1
    flair = np.linspace(90.0, 110.0, fvh.size, dtype=np.float32).reshape(shape)  # median 100, p99 ~ 110
    flair[fvh > 0] = 250.0  # the sign: 2.5 times the brain median
    images = {"tmax": tmax, "brain": np.ones(shape, np.float32), "territory": territory, "fvh": fvh, "flair": flair}
    for name, arr in images.items():
        nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0), np.eye(4)), str(d / f"{name}.nii.gz"))
    return d


def test_the_oracle_calls_the_whole_territory_of_a_sign_and_nothing_without_one(tmp_path: Path):
    dice, voxels, called_ml = fvh_territory_oracle(_case(tmp_path, (1, 2, 7)))  # a sign in territory 2
    assert voxels == 1
    assert dice == pytest.approx(2 * 100 / (200 + 100))  # called 200 voxels, 100 of them true
    assert called_ml == pytest.approx(200 * 1e-3)  # 1 mm voxels
    assert fvh_territory_oracle(_case(tmp_path, None)) == (0.0, 0, 0.0)


def test_defuse3_bounds_count_the_model_elsewhere_and_the_better_call_on_no_core_studies():
    def row(case: str, core: float, true_yes: bool, model_yes: bool, no_stroke: bool = False) -> dict:
        return {"case": case, "core_ml": core, "no_stroke": no_stroke, "true_defuse3": true_yes,
                "model_defuse3": model_yes, "model_defuse3_agree": true_yes == model_yes}

    studies = [
        row("core_wrong", 22.0, True, False),  # a core study the model calls wrong: the ceiling forgives it
        row("healthy", 0.0, False, False, no_stroke=True),
        row("tia_oracle", 0.0, True, False),  # the oracle's 40 mL calls it right, the model not
        row("m2_model", 0.0, True, True),  # the model right, the oracle's 5 mL not
        row("tia_neither", 0.0, True, False),
    ]
    b = defuse3_bounds(studies, {"tia_oracle": 40.0, "m2_model": 5.0, "tia_neither": 0.0}, visible=1.0)
    assert (b.no_core, b.no_core_yes, b.model_no_core, b.oracle_no_core) == (3, 3, 1, 1)
    assert b.model == pytest.approx(2 / 5)
    assert b.ceiling == pytest.approx(4 / 5)  # core study and healthy brain right, 2 of 3 no-core
    assert b.nearer == pytest.approx(3 / 5)  # the core study stays wrong


def test_sign_contrast_measures_the_sign_against_the_brains_bright_tail(tmp_path: Path):
    sc = sign_contrast(_case(tmp_path, (1, 2, 7)))
    assert sc is not None and sc.sign_median == pytest.approx(2.5, rel=0.01)
    assert sc.brain_p99 == pytest.approx(1.1, abs=0.01)
    assert sign_contrast(_case(tmp_path, None)) is None


def test_a_one_voxel_sign_is_lost_on_a_coarser_grid_and_a_wide_one_is_not(tmp_path: Path):
    (tmp_path / "thin").mkdir(), (tmp_path / "wide").mkdir()
    thin = _case(tmp_path / "thin", (1, 2, 7))  # one voxel: a quarter of the 2x2 block a 5x5 grid voxel averages
    assert sign_contrast(thin) is not None and sign_contrast(thin, grid=5) is None
    wide = _case(tmp_path / "wide", (1, slice(2, 4), slice(6, 8)))  # a 2x2 block that is one grid voxel
    sc = sign_contrast(wide, grid=5)
    assert sc is not None and sc.sign_median > sc.brain_p99


def test_sign_reach_counts_the_hypoperfused_slices_within_the_window_and_what_the_map_found_there(tmp_path: Path):
    case = _case(tmp_path, (1, 2, 7))  # the sign on slice 1; every slice hypoperfused (25 voxels each)
    mean = np.full((4, 10, 10), 2.0, np.float32)
    mean[0, 5:, 5:] = 9.0  # the map finds slice 0's hypoperfusion and nothing else
    mean[3, 5:, 5:] = 9.0  # ... and slice 3's, which is out of a 3-slice window's reach of the sign
    reach = sign_reach(case, mean, k=3)
    assert reach == (4, 3, 75, 25)  # slices 0-2 in reach; 25 of their 75 true voxels found
    assert sign_reach(case, mean, k=5) == (4, 4, 100, 50)


def test_best_threshold_and_the_no_core_share_the_line_needs():
    # volumes 1..6, truly "yes" from 4 up except the 5: cutting at 4 gets 5 of 6
    acc, th = best_threshold_accuracy([1, 2, 3, 4, 5, 6], [False, False, False, True, False, True])
    assert (acc, th) == (pytest.approx(5 / 6), 4.0)
    # all "no" is a candidate: nothing beats it when every study is "no"
    assert best_threshold_accuracy([3, 9], [False, False]) == (1.0, float("inf"))

    def row(case: str, core: float, agree: bool, no_stroke: bool = False) -> dict:
        return {"case": case, "core_ml": core, "no_stroke": no_stroke, "model_defuse3_agree": agree}

    studies = [row("c1", 30.0, True), row("c2", 30.0, False), row("h", 0.0, True, no_stroke=True),
               row("n1", 0.0, False), row("n2", 0.0, False)]
    # 80 % of 5 is 4 right; 2 of the 3 others are right, so both no-core studies must be
    assert needed_no_core_share(studies, visible=1.0, target=0.8) == pytest.approx(1.0)
    assert needed_no_core_share(studies, visible=1.0, target=0.6) == pytest.approx(0.5)


def test_evidence_lines_report_auroc_cuts_and_the_needed_share():
    def row(case: str, model_ml: float, true_yes: bool, core: float = 0.0) -> dict:
        return {"case": case, "core_ml": core, "no_stroke": False, "true_defuse3": true_yes,
                "model_tmax6_ml": model_ml, "model_defuse3": model_ml >= 15,
                "model_defuse3_agree": (model_ml >= 15) == true_yes}

    studies = [row("a", 2.0, False), row("b", 8.0, True), row("c", 20.0, True), row("d", 40.0, True, core=30.0)]
    lines = evidence_lines(studies, {"a": 0, "b": 5, "c": 1}, visible=1.0, target=0.75)
    assert lines[0] == "| model's Tmax>6 s volume | 1.000 | 0.667 at 15 mL (the served rule) |"
    assert lines[1] == "| model's Tmax>6 s volume, best single threshold here | | 1.000 at 8 |"
    assert lines[2].startswith("| drawn vessel-sign voxels (truth) | 1.000 |")
    assert lines[-1] == "| needed for 75% over all 4 studies | | 0.667 |"  # 3 of 4; the core study is right
