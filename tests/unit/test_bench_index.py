"""`python -m bench` (make bench): benches that score what other commands made are skipped with how to
run them, instead of being run without their inputs and counted as failed."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import modules_with_main

ROOT = Path(__file__).resolve().parents[2]
NEEDING = sorted(name for name, needs in modules_with_main().items() if needs)


def test_the_benches_that_need_data_are_the_ones_that_cannot_run_without_arguments() -> None:
    assert {"paired_eval", "no_core_ceiling", "tmax_cut"} <= set(NEEDING)
    assert "core_floor" not in NEEDING and "core_rule" not in NEEDING  # these make their own cases


@pytest.mark.parametrize("name", NEEDING)
def test_a_bench_marked_as_needing_data_stops_at_its_arguments(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"bench.{name}").main([])
    assert stop.value.code == 2 and "usage" in capsys.readouterr().err


def test_make_bench_lists_it_as_skipped_and_exits_0() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "paired_eval"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "bench.paired_eval: skipped, it needs synthperf evaluate output folders" in out.stdout
    assert "python -m bench.paired_eval --help" in out.stdout
