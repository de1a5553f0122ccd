"""``synthperf dataset build`` on phantom studies with DSC: good studies become training cases on
the DWI grid with the deconvolved Tmax, a study whose DSC stops before the bolus washes out is
excluded with that reason, a second run only does the new study, and ``synthperf train`` trains on
the output for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli.main import main as cli_main
from models.tmax_ddpm.data import list_cases, load_case
from tests.unit.test_model import TINY

phantom_api = pytest.importorskip("phantom.api")
SCENARIOS = [{"occlusion": "M1", "side": "left", "collaterals": "moderate", "onset_h": 3.0},
             {"occlusion": "M1", "side": "right", "collaterals": "poor", "onset_h": 2.0},
             {"occlusion": "ICA-T", "side": "left", "collaterals": "good", "onset_h": 4.0}]


def _write(root: Path, seed: int, scenario: dict, vendor: str, truncate: bool = False) -> None:
    case = phantom_api.make_case(seed, matrix=64, with_dsc=True, scenario=scenario)
    if truncate:  # the acquisition stopped a few seconds after the bolus peak
        n = max(21, int(case.truth["acquisition"]["dsc"]["bolus_arrival_s"]) + 9)
        case.dsc, case.dsc_times_s = case.dsc[:n], case.dsc_times_s[:n]
    phantom_api.write_dicom_study(case, root / f"study_{seed}", vendor, enhanced=False, split_b=False)


@pytest.mark.slow
def test_dataset_build_qc_resume_and_train(tmp_path: Path, capsys):
    studies, data = tmp_path / "studies", tmp_path / "data"
    _write(studies, 3, SCENARIOS[0], "siemens")
    _write(studies, 4, SCENARIOS[1], "ge")
    _write(studies, 5, SCENARIOS[2], "philips", truncate=True)
    assert cli_main(["dataset", "build", str(studies), "--out", str(data), "--jobs", "2", "--no-progress"]) == 0
    report = json.loads((data / "qc_report.json").read_text())
    assert report["studies"] == 3 and report["included"] == 2
    [excluded] = report["excluded"]
    assert excluded["case_id"] == "study_5"
    assert any("truncated" in r for r in excluded["reasons"]), excluded
    assert "excluded study_5: DSC truncated" in capsys.readouterr().out
    assert not (data / "study_5").exists()
    csv_lines = (data / "qc_report.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and "truncated" in csv_lines[-1]
    kept = [r for r in report["records"] if r["included"]]
    assert all(r["aif"]["ok"] and r["coverage"] >= 0.7 and not r["motion"]["moved"] for r in kept)

    # the cases are what the training code reads: one grid, Tmax from the deconvolution
    cases = list_cases(data)
    assert [c.name for c in cases] == ["study_3", "study_4"]
    truth = phantom_api.make_case(3, matrix=64, with_dsc=True, scenario=SCENARIOS[0])
    c = load_case(cases[0])
    assert c.images["tmax"].shape == truth.tmax.shape == c.images["dwi"].shape == c.images["adc"].shape
    brain = c.images["brain"] > 0
    t6, true6 = (c.images["tmax"] > 6) & brain, (truth.tmax > 6) & brain
    dice = 2 * (t6 & true6).sum() / (t6.sum() + true6.sum())
    assert dice >= 0.75, dice  # the DSC-derived target, not the phantom's truth (measured ~0.85 elsewhere)
    assert not np.array_equal(c.images["tmax"], truth.tmax)

    # resumable: a new study is the only one processed on the next run
    _write(studies, 6, SCENARIOS[0], "siemens")
    assert cli_main(["dataset", "build", str(studies), "--out", str(data), "--no-progress"]) == 0
    report = json.loads((data / "qc_report.json").read_text())
    assert report["skipped_as_done"] == 3 and report["studies"] == 4 and report["included"] == 3

    # synthperf train on the output, tiny network, a few steps
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": TINY, "train": {"steps": 4, "batch_size": 4, "log_every": 2, "lr_warmup": 2,
                                                        "seed": 3, "num_threads": 1, "bf16_cpu": False},
                               "sample": {"steps": 2, "samples": 1}}))
    run = tmp_path / "run"
    assert cli_main(["train", str(data), "--out", str(run), "--config", str(cfg), "--device", "cpu",
                     "--no-progress"]) == 0
    assert (run / "checkpoint.pt").is_file()
