"""`synthperf classify PATH... [--json] [--select] [--rules FILE]` on real data."""

from __future__ import annotations

import json
from pathlib import Path

from cli.main import main


def test_json_lines_one_per_series(realdata: Path, capsys):
    rc = main(["classify", str(realdata / "dcm_qa_xa30i"), "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6
    by_num = {r["series_number"]: r for r in rows}
    trace = by_num[13001]
    assert trace["role"] == "DWI" and trace["b_values"] == [2500.0] and trace["trace"] is True
    assert trace["series_instance_uid"] == "1.3.12.2.1107.5.2.43.67093.30000023011319484937100005395"
    assert trace["series_description"] == "DWI_dir80_AP_TRACEW"
    assert trace["folder"].endswith("13001_DWI_TRACEW")
    assert trace["evidence"][0] == ["diffusion-b-siemens", "b_siemens_max", "2500"]
    assert by_num[15001]["role"] == "OTHER" and by_num[12001]["role"] == "ADC"
    assert all(0 < r["confidence"] <= 0.99 for r in rows)


def test_text_lines_and_selection_error(realdata: Path, capsys):
    rc = main(["classify", str(realdata / "dcm_qa_xa30"), "--select"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 3
    assert out[-1].startswith("selection: no FLAIR: only DWI and ADC arrived")
    asl = next(line for line in out if "27_ASL_PerfusionWeighted" in line)
    fields = asl.split("\t")
    assert fields[3] == "OTHER" and "asl: asl=True" in fields[-1]


def test_selection_json(realdata: Path, capsys):
    rc = main(["classify", str(realdata / "dcm_qa_philips_dwi"), str(realdata / "dicom2nifti" / "philips_anatomical_001"),
               "--select", "--json"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["selection"]["b_high"] == 1000.0 and last["selection"]["adc"] is None


def test_bad_rules_file_names_the_rule(tmp_path: Path, realdata: Path, capsys):
    bad = tmp_path / "rules.yaml"
    bad.write_text("version: 1\nrules:\n  - {name: x, role: PWI, confidence: 0.5, when: []}\n")
    rc = main(["classify", str(realdata / "dcm_qa_ts"), "--rules", str(bad)])
    assert rc == 2
    assert "rule 'x' (#1): role 'PWI'" in capsys.readouterr().err


def test_no_dicom(tmp_path: Path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["classify", str(tmp_path)]) == 1
    assert "no DICOM images" in capsys.readouterr().err
