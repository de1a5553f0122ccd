"""`synthperf phantom`: training fast path layout and the full DICOM path."""

from __future__ import annotations

import json

from cli.main import main

TRAINING = {"dwi.nii.gz", "b0.nii.gz", "adc.nii.gz", "flair.nii.gz", "core.nii.gz", "tmax.nii.gz",
            "brain.nii.gz", "territory.nii.gz", "truth.json"}


def test_training_only_layout_and_seeds(tmp_path, capsys):
    rc = main(["phantom", "--out", str(tmp_path), "--cases", "2", "--seed", "100000", "--training-only",
               "--workers", "1", "--preview"])
    assert rc == 0
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["case_100000", "case_100001"]
    for i, d in enumerate(dirs):
        files = {p.name for p in (tmp_path / d).iterdir()}
        assert TRAINING <= files and "preview.png" in files and "dicom" not in files
        assert json.loads((tmp_path / d / "truth.json").read_text())["seed"] == 100000 + i
    out = capsys.readouterr().out
    assert "[2/2]" in out and "SYNTHETIC" in out


def test_full_path_writes_dicom_and_truth(tmp_path):
    rc = main(["phantom", "--out", str(tmp_path), "--cases", "1", "--seed", "7", "--vendor", "ge",
               "--workers", "1"])
    assert rc == 0
    case = tmp_path / "case_000007"
    assert TRAINING <= {p.name for p in case.iterdir()}
    study = json.loads((case / "dicom" / "study.json").read_text())
    assert study["vendor"] == "ge" and study["synthetic"] is True
    roles = {s["role"] for s in study["series"]}
    assert {"localizer", "t1", "dwi", "adc", "flair"} <= roles
    assert json.loads((case / "truth.json").read_text())["vendor"] == "ge"


def test_bad_arguments_exit_nonzero(tmp_path):
    assert main(["phantom", "--out", str(tmp_path), "--cases", "0"]) == 2
