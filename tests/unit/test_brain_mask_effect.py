"""bench.brain_mask_effect: the service's mask made from a case's b0 lies on the case's own grid."""

from __future__ import annotations

import numpy as np

from bench.brain_mask_effect import service_mask, summary
from models.tmax_ddpm.data import load_case
from models.tmax_ddpm.metrics import dice
from phantom.api import make_case, write_training_case


def test_the_service_mask_covers_the_true_brain_on_the_same_grid(tmp_path) -> None:
    case = load_case(write_training_case(make_case(3, matrix=64, family="geometric"), tmp_path), ("b0", "brain"))
    served = service_mask(case)
    assert served.shape == case.brain.shape
    assert (served & case.brain).sum() > 0.97 * case.brain.sum()  # the true brain lies inside it
    assert dice(served, case.brain) > 0.85
    # the same mask on a mirrored grid would not fit: the test can tell a transposed or flipped result
    assert dice(served[:, :, ::-1].copy(), case.brain) < dice(served, case.brain)


def test_summary_counts_healthy_false_volume_and_stroke_dice() -> None:
    rows = [{"case": "a", "stroke": False, "mask_ratio": 1.1, "mask_dice": 0.95, "true_brain_tmax6_ml": 2.0,
             "service_mask_tmax6_ml": 20.0, "true_brain_dice6": 0.0, "service_mask_dice6": 0.0},
            {"case": "b", "stroke": True, "mask_ratio": 1.3, "mask_dice": 0.9, "true_brain_tmax6_ml": 50.0,
             "service_mask_tmax6_ml": 60.0, "true_brain_dice6": 0.8, "service_mask_dice6": 0.7}]
    lines = summary(rows)
    assert "1.20x (max 1.30x)" in lines[0]
    assert "healthy 1 false Tmax>6 s mean 2.0 mL, max 2.0, over 15 mL 0 | stroke 1 Dice 0.800" in lines[1]
    assert "mean 20.0 mL, max 20.0, over 15 mL 1 | stroke 1 Dice 0.700" in lines[2]
    assert np.isclose(float(lines[0].split("mask Dice ")[1]), 0.925)
