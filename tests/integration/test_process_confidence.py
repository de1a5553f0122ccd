"""``synthperf process`` on a study the demo model does not know (issue 15): a healthy brain with domain
randomisation (geometric family, seed 270004, held out), on which the demo model calls false
hypoperfusion mirrored in both hemispheres. The study still gets its maps, but result.json, the SR and the summary page say "low
confidence" and give no DEFUSE-3/EXTEND call."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pytest

from cli.main import main as cli_main
from tests.integration.test_process import DEMO_WEIGHTS


@pytest.mark.slow
def test_low_confidence_study_gets_maps_and_no_trial_call(tmp_path: Path) -> None:
    if not DEMO_WEIGHTS.is_file():
        pytest.skip("needs the demo weights (an untrained model's confidence means nothing)")
    api = pytest.importorskip("phantom.api")
    case = api.make_case(270004, matrix=128, family="geometric", randomise=True)  # no stroke
    assert not case.core.any() and not (case.tmax > 6).any()
    study = api.write_dicom_study(case, tmp_path / "study", "siemens", enhanced=False, split_b=False)
    out = tmp_path / "out"
    assert cli_main(["process", str(study), "--out", str(out), "--samples", "4", "--seed", "0",
                     "--model", "demo", "--inference-path", "fp32"]) == 0
    result = json.loads((out / "result.json").read_text())
    conf = result["confidence"]
    assert conf["low"] and conf["score"] < conf["threshold"] and conf["reasons"]
    assert conf["parts"]["diffusion"] == 1.0  # the load stage's record reached it: trace DWI at b = 1000
    assert result["defuse3"] is None and result["extend"] is None
    assert result["measures"]["calls_withheld"] == "withheld (low confidence)"
    assert result["tmax6_ml"] > 15  # the false hypoperfusion is still reported as measured
    names = {p.name for p in (out / "dicom").glob("*.dcm")}
    assert {"tmax.dcm", "seg.dcm"} <= names  # the maps are made
    profile = hd.sr.srread(out / "dicom" / "sr.dcm").content.get_volumetric_roi_measurement_groups()[-1]
    flags = {q.name.value: q.value.meaning for q in profile.get_qualitative_evaluations()}
    assert "DEFUSE3" not in flags and flags["LOW_CONFIDENCE"] == "Yes"
