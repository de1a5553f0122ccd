"""models.tmax_ddpm.preprocess.standardise_landmarks on a phantom FLAIR with its cortex stretched."""

from __future__ import annotations

import numpy as np
import pytest

from models.tmax_ddpm.preprocess import standardise_landmarks
from phantom.api import make_case

TARGETS = {5: 0.46, 25: 0.90, 75: 1.09, 95: 1.24}


@pytest.fixture(scope="module")
def stretched():
    return make_case(33, matrix=64, randomise=True, scenario={"occlusion": "none"}, grey_contrast=3.0)


def test_landmarks_land_on_targets(stretched):
    c = stretched
    img, brain = c.flair_on_dwi, c.brain
    out = standardise_landmarks(img, brain, brain, TARGETS)
    med = np.median(img[brain][img[brain] > 0])
    got = np.percentile(out[brain] / med, sorted(TARGETS))
    assert got == pytest.approx([TARGETS[q] for q in sorted(TARGETS)], abs=0.01)
    assert np.percentile(img[brain] / med, 95) > TARGETS[95] + 0.2  # the stretch put it well above the targets
    assert np.all(out[~brain & (img == 0)] == 0)  # background stays 0


def test_monotone_and_proportional_beyond_the_top_landmark(stretched):
    img, brain = stretched.flair_on_dwi, stretched.brain
    out = standardise_landmarks(img, brain, brain, TARGETS)
    order = np.argsort(img[brain], kind="stable")
    assert np.all(np.diff(out[brain][order]) >= -1e-4)  # ranks kept: a bright lesion stays the brightest
    top = np.percentile(img[brain], 95)
    bright = brain & (img > top * 1.05)
    ratios = out[bright] / img[bright]
    assert bright.sum() > 10 and np.ptp(ratios) < 1e-4  # one factor above the top landmark


def test_unusable_landmarks_leave_the_image_unchanged():
    flat = np.ones((4, 8, 8), dtype=np.float32)
    brain = np.ones_like(flat, dtype=bool)
    assert np.array_equal(standardise_landmarks(flat, brain, brain, TARGETS), flat)
    assert np.array_equal(standardise_landmarks(flat, brain, np.zeros_like(brain), TARGETS), flat)
