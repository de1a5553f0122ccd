"""bench.paired_eval: models' per-case evaluations pooled and compared case by case against a reference."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from bench.paired_eval import case_strata, cue_class, model_figures, paired, pooled_rows, report

COLUMNS = ("case", "no_stroke", "core_ml", "model_dice6", "model_vol6_err_ml", "model_tmax6_ml",
           "model_defuse3", "model_defuse3_agree", "true_defuse3", "confidence", "confidence_low", "bad")


def _eval(d: Path, rows: list[dict]) -> Path:
    """A per_case.csv as synthperf evaluate writes it (True/False and numbers as text)."""
    d.mkdir(parents=True)
    with open(d / "per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return d


def _row(case: str, dice: float, core_ml: float = 20.0, no_stroke: bool = False, conf: float = 0.9) -> dict:
    return {"case": case, "no_stroke": no_stroke, "core_ml": core_ml, "model_dice6": dice, "model_vol6_err_ml": -5.0,
            "model_tmax6_ml": 3.0 if no_stroke else 80.0, "model_defuse3": not no_stroke,
            "model_defuse3_agree": True, "true_defuse3": not no_stroke, "confidence": conf, "confidence_low": conf < 0.5,
            "bad": (not no_stroke) and dice < 0.5}


def test_the_paired_difference_is_the_mean_of_per_case_differences_with_its_standard_error():
    p = paired([0.5, 0.7, 0.9], [0.4, 0.7, 0.6])
    assert p is not None
    assert p.mean == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    sd = math.sqrt(((0.1 - p.mean) ** 2 + p.mean**2 + (0.3 - p.mean) ** 2) / 2)
    assert p.se == pytest.approx(sd / math.sqrt(3))
    assert (p.worse, p.better, p.n) == (0, 2, 3)  # the unchanged case is neither
    assert paired([0.5], [0.4]) is None
    with pytest.raises(ValueError, match="2 model scores against 1"):
        paired([0.5, 0.6], [0.4])


def test_a_set_split_over_two_evaluations_is_pooled_and_a_case_counted_twice_is_refused(tmp_path: Path):
    a = _eval(tmp_path / "p0", [_row("case_000001", 0.8), _row("case_000002", 0.2, core_ml=0.0)])
    b = _eval(tmp_path / "p1", [_row("case_000003", 0.0, no_stroke=True, conf=0.3)])
    rows = pooled_rows([a, b])
    assert sorted(rows) == ["case_000001", "case_000002", "case_000003"]
    f = model_figures(rows)
    assert f["stroke"] == 2 and f["dice6_stroke"] == pytest.approx(0.5)
    assert f["dice6_core"] == pytest.approx(0.8) and f["dice6_no_core"] == pytest.approx(0.2)
    assert f["served"] == 2 and f["healthy_false_ml_mean"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="case_000001 is in more than one"):
        pooled_rows([a, a])
    with pytest.raises(FileNotFoundError, match="no per_case.csv"):
        pooled_rows([tmp_path / "missing"])


def test_strata_come_from_each_cases_truth_and_the_report_splits_the_difference_by_them(tmp_path: Path):
    for case, scale, fvh in (("case_000001", 1.1, "strong"), ("case_000002", 0.0, "absent"), ("case_000003", 0.3, "weak")):
        (tmp_path / "data" / case).mkdir(parents=True)
        (tmp_path / "data" / case / "truth.json").write_text(
            json.dumps({"domain": {"penumbral_scale": scale, "fvh": fvh}}))
    strata = case_strata([tmp_path / "data"])
    assert [strata[c]["cue"] for c in sorted(strata)] == ["full", "absent", "weak"]
    assert cue_class(None) == "unknown" and cue_class(0.65) == "full"
    ref = pooled_rows([_eval(tmp_path / "ref", [_row("case_000001", 0.8), _row("case_000002", 0.2),
                                                 _row("case_000003", 0.5)])])
    new = pooled_rows([_eval(tmp_path / "new", [_row("case_000001", 0.7), _row("case_000002", 0.6),
                                                 _row("case_000003", 0.5)])])
    text = "\n".join(report({"ref": ref, "new": new}, strata))
    assert "| new | 3 (3) | 0.600 |" in text
    assert "- all: 0.600 against 0.500, +0.100" in text
    assert "worse on 1, better on 1 of 3" in text
    # one case per cue stratum: too few for a standard error, so no line rather than a made-up one
    assert "- cue absent" not in text
