"""Measures against the phantom's own truth: volumes, side (through the grid's direction) and the
DWI-FLAIR indicator against the known onset time.

Inputs are make_case arrays (truth core and truth Tmax on the DWI grid, FLAIR resampled onto it),
with the stroke pinned to an M1 occlusion at 1 h (FLAIR-negative core) or 12 h (FLAIR-bright core).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import small_scale
from worker.pipeline.measure import compute_measures

SEEDS = (2, 7) if small_scale() else (2, 3, 7, 8, 9, 10)


@pytest.mark.slow
@pytest.mark.parametrize("onset_h", [1.0, 12.0])
def test_measures_match_phantom_truth(onset_h: float) -> None:
    from phantom.api import make_case

    for seed in SEEDS:
        case = make_case(seed, scenario={"onset_h": onset_h, "occlusion": "M1"})
        truth = case.truth
        ml = float(np.prod(case.spacing_zyx)) / 1000.0
        m = compute_measures(case.core, case.tmax, case.brain, ml, flair=case.flair_on_dwi,
                             spacing_zyx=case.spacing_zyx, direction=case.direction)
        assert m.core_ml == pytest.approx(truth["core_ml"], abs=1e-3)
        assert m.tmax6_ml == pytest.approx(truth["tmax6_ml"], abs=1e-3)
        assert m.tmax10_ml == pytest.approx(truth["tmax10_ml"], abs=1e-3)
        assert m.hir == pytest.approx(truth["hir"], abs=1e-3)
        assert m.side == truth["side"], f"seed {seed}"
        if truth["core_ml"] > 0:
            assert m.defuse3 == truth["defuse3_target_mismatch"]
            # The FLAIR ratio tracks the phantom's core/normal FLAIR contrast for this onset.
            assert m.flair_ratio == pytest.approx(truth["flair_core_ratio"], abs=0.1)
            assert m.dwi_flair_mismatch is (onset_h < 4.5), f"seed {seed}, onset {onset_h} h"
