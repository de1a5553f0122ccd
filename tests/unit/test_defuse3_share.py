"""bench.defuse3_share: the DEFUSE-3 call read from the share of samples that make it, not the mean map."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench.defuse3_share import agreement, choose, kind, main, mean_map_call, sample_share, share_call
from models.tmax_ddpm.metrics import defuse3


def _row(case: str, core_ml: float, true_ml: float, sample_ml: list[float], mean_ml: float, low: bool = False) -> dict:
    """A per_case.csv row as evaluate writes it, the calls worked out with DEFUSE-3's own rule."""
    def target(v: float) -> bool:
        return defuse3(core_ml, v)["target"]

    return {
        "case": case, "core_ml": core_ml, "true_tmax6_ml": true_ml, "no_stroke": core_ml == 0 and true_ml == 0,
        "true_defuse3": target(true_ml), "model_defuse3": target(mean_ml),
        "model_sample_tmax6_ml": ";".join(f"{v:.1f}" for v in sample_ml),
        "model_defuse3_share": sum(map(target, sample_ml)) / len(sample_ml), "confidence_low": low,
    }


# a no-core study whose territory 5 of 8 samples draw, while the mean map falls under 6 s there;
# a healthy brain where 2 samples draw a false region; a study with a core all samples call right
ROWS = [
    _row("tia", 0.0, 80.0, [60, 55, 70, 40, 0, 0, 0, 30], mean_ml=9.0, low=True),
    _row("healthy", 0.0, 0.0, [0, 0, 20, 0, 0, 0, 18, 0], mean_ml=0.0, low=True),
    _row("m1", 20.0, 120.0, [110.0] * 8, mean_ml=110.0),
]


def test_the_sample_majority_calls_a_territory_the_mean_map_misses():
    assert [kind(r) for r in ROWS] == ["no core", "healthy", "core"]
    assert [sample_share(r) for r in ROWS] == [0.625, 0.25, 1.0]
    mean = agreement(ROWS, mean_map_call)
    assert mean["all"] == pytest.approx(2 / 3) and mean["no core"] == 0.0 and mean["healthy yes"] == 0
    half = agreement(ROWS, share_call(0.5))
    assert half["all"] == 1.0 and half["healthy yes"] == 0
    # a share low enough to catch the healthy brain's two samples calls it "yes"
    assert agreement(ROWS, share_call(0.25))["healthy yes"] == 1
    # served: only the study that is not low confidence gets a call
    assert half["n served"] == 1 and half["served"] == 1.0
    # every share from 3/8 to 5/8 agrees on all three; the tie goes to the largest (fewest "yes")
    assert choose(ROWS, [i / 8 for i in range(1, 9)]) == 0.625


def test_rows_without_sample_calls_are_refused():
    with pytest.raises(ValueError, match="tia: no model_defuse3_share"):
        sample_share({"case": "tia", "model_defuse3": False})


def test_main_reads_evaluations_and_prints_the_table(tmp_path: Path, capsys):
    for name in ("calib", "held"):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "per_case.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows(ROWS)
    assert main([str(tmp_path / "calib"), str(tmp_path / "held")]) == 0
    out = capsys.readouterr().out
    assert "8 samples a study; share chosen on calib: 'yes' when >= 0.625" in out
    assert "| held | samples >= 0.625 | 3 | 1.000 |" in out and "| held | mean map | 3 | 0.667 |" in out
