"""bench.noise_texture: what the ADC noise estimator reads on a repeated pair -- noise on a flat image,
anatomy on a clean real one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.noise_texture import bold_pair, phantom_floor, texture_against_pair


def test_on_a_flat_pair_the_estimator_reads_the_noise_the_pair_difference_measures() -> None:
    rng = np.random.default_rng(0)
    flat = np.full((8, 48, 48), 500.0, np.float32)
    brain = np.zeros(flat.shape, bool)
    brain[:, 6:42, 6:42] = True
    first, second = (flat + rng.normal(0, 20.0, flat.shape).astype(np.float32) for _ in range(2))
    r = texture_against_pair(first, second, brain)
    assert abs(r["pair_noise"] - 20.0) < 1.0
    assert 0.7 < r["ratio"] < 1.1  # a 3 x 3 median's residual holds a little less than the noise
    assert r["texture_pct"] < 0.5


def test_on_the_real_bold_pair_anatomy_outweighs_the_noise_and_the_phantom_is_smoother(realdata: Path) -> None:
    real = texture_against_pair(*bold_pair(realdata / "dcm_qa_xa30" / "7_BOLD"))
    assert real["snr"] > 50 and real["ratio"] > 3, real
    phantom = phantom_floor(range(710000, 710002))
    assert all(row["b0_pct"] < real["texture_pct"] / 3 for row in phantom), (real, phantom)
    assert all(0 < row["adc"] < 50 for row in phantom), phantom
