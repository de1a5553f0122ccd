"""The core rule against phantom truth (issue 6 acceptance), on make_case arrays.

Input is the phantom's arrays on the DWI grid (``phantom.api.make_case``: adc in 1e-6 mm^2/s,
trace DWI, brain mask, direction), not DICOM read back through worker.pipeline.load. The vendor
styles differ only in DICOM headers, the pixel data is the same, so the arrays carry the figure;
the seeds below still span all three vendors (asserted). ADC units are left to the detector.

Full scale (SYNTHPERF_SLOW_SCALE != small): 30 seeds, >= 20 of them with a core. Small scale
(make test): 6 seeds. Acceptance: median Dice >= 0.85, median absolute volume error < 3 mL.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from tests.conftest import small_scale
from worker.pipeline.core import segment_core

SEEDS = range(6) if small_scale() else range(30)


@lru_cache(maxsize=64)
def _run(seed: int) -> tuple[object, np.ndarray]:
    from phantom.api import make_case

    case = make_case(seed)
    res = segment_core(case.adc, case.dwi, case.brain, case.spacing_zyx, direction=case.direction)
    assert res.method == "rule" and res.adc_units == "1e-6 mm2/s"
    return case, res.mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.slow
def test_core_dice_and_volume_on_phantom_cohort() -> None:
    dices, errors, empty_fp, vendors = [], [], [], set()
    for seed in SEEDS:
        case, mask = _run(seed)
        vendors.add(case.vendor)
        ml = float(np.prod(case.spacing_zyx)) / 1000.0
        true_ml, found_ml = float(case.core.sum()) * ml, float(mask.sum()) * ml
        errors.append(abs(found_ml - true_ml))
        if case.core.any():
            dices.append(_dice(mask, case.core))
        else:
            empty_fp.append(found_ml)
    if not small_scale():
        assert len(dices) >= 20, f"only {len(dices)} phantom cases with a core"
        assert vendors == {"siemens", "ge", "philips"}
    assert dices, "no phantom case with a core"
    print(f"\nphantom core: {len(dices)} cases with core, median Dice {np.median(dices):.3f} "
          f"(min {min(dices):.3f}), median |vol err| {np.median(errors):.2f} mL (max {max(errors):.2f}), "
          f"core-free cases {len(empty_fp)} with max {max(empty_fp, default=0):.2f} mL called core")
    assert np.median(dices) >= 0.85
    assert np.median(errors) < 3.0
    assert all(v < 0.5 for v in empty_fp), empty_fp


def _confounders(case: object) -> tuple[np.ndarray, np.ndarray]:
    """WMH and old-infarct masks on the DWI grid, rebuilt from the phantom's own model.

    make_case does not return them; the anatomy is re-rendered from the seed's streams exactly as
    make_case does, and checked against the case's tissue classes so a drift in the phantom shows.
    """
    from phantom import anatomy
    from phantom.fields import Sampler
    from phantom.geometry import RigidPose, rotation_matrix
    from phantom.render import HeadModel

    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(case.seed).spawn(10)]
    head = HeadModel(*streams[:4])
    pose = RigidPose(rotation_matrix(head.anat.tilt_deg), head.anat.shift_mm.astype(float))
    q = pose.to_head(case.grid.world_points())
    t = anatomy.tissue_classes(q, head.anat, head.fields.sampled(Sampler(q)))
    assert np.array_equal(t["cls"], case.tissue), "phantom anatomy rebuilt differently from make_case"
    return t["wmh"] > 0.3, t["old_rim"] | t["old_cavity"]


# Seeds whose anatomy has an old infarct and/or WMH grade >= 2 (19: no acute core at all).
CONFOUNDER_SEEDS = (1, 8, 19, 27) if small_scale() else (1, 5, 8, 9, 13, 17, 19, 21, 22, 23, 26, 27, 28, 29)


@pytest.mark.slow
def test_chronic_infarcts_and_wmh_are_not_core() -> None:
    checked_old = checked_wmh = 0
    for seed in CONFOUNDER_SEEDS:
        case, mask = _run(seed)
        wmh, old = _confounders(case)
        assert not (mask & old).any(), f"seed {seed}: old infarct called core"
        # WMH voxels inside the acute core are core; outside it they must not be.
        assert not (mask & wmh & ~case.core).any(), f"seed {seed}: WMH called core"
        checked_old += int(old.sum() > 20)
        checked_wmh += int((wmh & ~case.core).sum() > 20)
    assert checked_old >= 2 and checked_wmh >= 2, (checked_old, checked_wmh)


def test_noise_support_removes_a_core_of_noise_and_keeps_the_lesion() -> None:
    """Seed 210016 (geometric, randomised, no stroke) is drawn at ADC noise SD 160 x 10^-6 mm^2/s, the
    noisiest of its 24-case set: without the noise support the rule chained isolated low voxels into a
    9.3 mL core (session 28). Seed 210008 (same set, a 10.7 mL core) keeps its core Dice (0.865 both ways)."""
    from dataclasses import replace

    from phantom.api import make_case
    from worker.pipeline.core import CoreParams, segment_core_rule

    params = CoreParams()
    off = replace(params, low_support=0)
    healthy, stroke = (make_case(s, randomise=True, family="geometric") for s in (210016, 210008))
    ml = float(np.prod(healthy.spacing_zyx)) / 1000.0
    assert not healthy.core.any() and stroke.core.sum() * float(np.prod(stroke.spacing_zyx)) / 1000 > 5

    def rule(c: object, p: CoreParams) -> np.ndarray:
        return segment_core_rule(c.adc, c.dwi, c.brain, c.spacing_zyx, p, direction=c.direction)[0]

    noise_off, noise_on = rule(healthy, off).sum() * ml, rule(healthy, params).sum() * ml
    assert noise_off >= 5.0, noise_off  # the premise: a core of noise without the support
    assert noise_on <= 0.3 * noise_off, (noise_off, noise_on)
    d_off, d_on = _dice(rule(stroke, off), stroke.core), _dice(rule(stroke, params), stroke.core)
    assert d_on >= 0.8 and d_on >= d_off - 0.01, (d_off, d_on)


def test_noise_support_rises_with_the_adc_noise() -> None:
    """Seed 710038 (mixed -> geometric, randomised, a stroke without a core) at DWI b0 SNR 10, below the
    drawn range: ADC noise SD 216. With the support held at 2 neighbours the rule called 41.5 mL of
    noise core (session 28); raised to 4 by the noise, about 1 mL, and the job is told why."""
    from dataclasses import replace

    from phantom.api import make_case
    from worker.pipeline.core import CoreParams, segment_core_rule

    c = make_case(710038, family="mixed", randomise=True, acquisition={"dwi_snr": 10.0, "flair_snr": 9.0})
    ml = float(np.prod(c.spacing_zyx)) / 1000.0
    assert not c.core.any()
    held, _ = segment_core_rule(c.adc, c.dwi, c.brain, c.spacing_zyx, replace(CoreParams(), noisy_support_above=()),
                                direction=c.direction)
    raised, warnings = segment_core_rule(c.adc, c.dwi, c.brain, c.spacing_zyx, CoreParams(), direction=c.direction)
    assert held.sum() * ml >= 20.0, held.sum() * ml  # the premise: a large core of noise at the fixed support
    assert raised.sum() * ml <= 0.1 * held.sum() * ml
    assert any("needs 4 of its 8" in w for w in warnings), warnings
