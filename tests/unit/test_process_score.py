"""bench.process_score: the truth read onto the service's grid by world coordinates, and a study's row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bench.process_score import score, summary_lines, truth_on_grid
from models.tmax_ddpm.metrics import defuse3
from phantom.api import make_case, write_training_case


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A phantom stroke study's truth volumes (the phantom's own NIfTI convention)."""
    case = make_case(1, matrix=32, family="geometric", scenario={"occlusion": "M1"})
    assert case.core.any() and (case.tmax > 6).any()
    return write_training_case(case, tmp_path_factory.mktemp("phantom"))


def _service_copy(src: Path, dst: Path, fn) -> Path:
    """``fn`` of a truth volume, written as the service writes its maps (SimpleITK) but with the in-plane
    axes flipped: the same world positions under a different voxel order and direction."""
    img = sitk.ReadImage(str(src))
    out = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(img)).astype(np.uint8))
    out.CopyInformation(img)
    out = sitk.Flip(out, [True, True, False])
    sitk.WriteImage(out, str(dst))
    return dst


def test_truth_on_a_flipped_grid_lands_on_the_same_world_positions(study: Path, tmp_path: Path):
    grid = _service_copy(study / "tmax.nii.gz", tmp_path / "tmax6.nii.gz", lambda a: a > 6)
    t = truth_on_grid(study, sitk.ReadImage(str(grid)))
    called = sitk.GetArrayFromImage(sitk.ReadImage(str(grid))) > 0
    assert not np.array_equal(called, sitk.GetArrayFromImage(sitk.ReadImage(str(study / "tmax.nii.gz"))) > 6)
    np.testing.assert_array_equal(t["tmax"] > 6, called)


def test_a_studys_row_scores_the_service_maps_and_its_calls(study: Path, tmp_path: Path):
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(study / "brain.nii.gz"))) > 0
    grid = _service_copy(study / "tmax.nii.gz", tmp_path / "tmax6.nii.gz", lambda a: (a > 6) & brain)
    core = _service_copy(study / "core.nii.gz", tmp_path / "core.nii.gz", lambda a: a > 0.5)
    voxel_ml = float(np.prod(sitk.ReadImage(str(grid)).GetSpacing())) / 1000.0
    core_ml = float((sitk.GetArrayFromImage(sitk.ReadImage(str(core))) > 0).sum()) * voxel_ml
    t6_ml = float((sitk.GetArrayFromImage(sitk.ReadImage(str(grid))) > 0).sum()) * voxel_ml
    result = {"ok": True, "nifti": {"tmax6": str(grid), "core": str(core)},
              "measures": {"core_ml": core_ml, "tmax6_ml": t6_ml / 2, "defuse3": None,
                           "confidence": {"score": 0.3, "low": True}},
              "registration": {"method": "Euler3D rigid, Mattes MI"}}
    row = score(study, result, 12.0)
    assert row["ok"] and not row["no_stroke"]
    assert row["dice6"] == pytest.approx(1.0) and row["core_dice"] == pytest.approx(1.0)
    assert row["true_tmax6_ml"] == pytest.approx(t6_ml)
    # the raw call comes from the service's own volumes (here half the truth), the served one is withheld
    assert row["raw_defuse3"] == defuse3(core_ml, t6_ml / 2)["target"]
    assert row["true_defuse3"] == defuse3(core_ml, t6_ml)["target"]
    assert row["served_defuse3"] == "withheld" and row["confidence_low"]

    failed = score(study, {"ok": False, "error": "no FLAIR series"}, 3.0)
    assert failed == {**{k: failed[k] for k in ("case", "family", "vendor", "case_type", "seconds")},
                      "ok": False, "error": "no FLAIR series"}
    lines = summary_lines([row, failed])
    assert lines[0].startswith("all: 2 studies, 1 failed") and "served nan on 0" in lines[0]
