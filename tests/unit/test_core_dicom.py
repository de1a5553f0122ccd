"""The core rule through the DICOM path: phantom study written in a vendor's header style,
classified (worker.pipeline.classify), loaded (worker.pipeline.load: its own brain mask, ADC
rescaled to 1e-6 mm^2/s), then segmented -- against the phantom's truth core on the DWI grid.

Small scale runs one vendor; full scale all three (siemens, ge, philips).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import small_scale
from worker.pipeline.core import segment_core

# seed -> the vendor make_case assigns it, each with an acute core (see phantom truth).
CASES = {0: "ge"} if small_scale() else {0: "ge", 1: "philips", 16: "siemens"}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "vendor"), sorted(CASES.items()))
def test_core_through_dicom_load(tmp_path: Path, seed: int, vendor: str) -> None:
    import SimpleITK as sitk

    from phantom.api import make_case, write_dicom_study
    from worker.pipeline.classify import classify_folder, select_inputs
    from worker.pipeline.load import load_study

    case = make_case(seed)
    assert case.vendor == vendor and case.core.sum() > 0
    study = write_dicom_study(case, tmp_path / vendor, vendor)
    loaded = load_study(select_inputs(classify_folder(study)), register=False)
    dwi = sitk.GetArrayFromImage(loaded.dwi).astype(np.float32)
    adc = sitk.GetArrayFromImage(loaded.adc).astype(np.float32)
    brain = sitk.GetArrayFromImage(loaded.brain) > 0
    assert dwi.shape == case.core.shape
    spacing = tuple(float(s) for s in loaded.dwi.GetSpacing()[::-1])
    assert np.allclose(spacing, case.spacing_zyx, atol=1e-3)
    res = segment_core(adc, dwi, brain, spacing, adc_units="1e-6 mm2/s", direction=loaded.dwi.GetDirection())
    assert not res.units_guessed
    ml = float(np.prod(spacing)) / 1000.0
    dice = _dice(res.mask, case.core)
    err = abs(float(res.mask.sum()) - float(case.core.sum())) * ml
    print(f"\n{vendor} seed {seed}: DICOM path core Dice {dice:.3f}, |vol err| {err:.2f} mL")
    assert dice >= 0.85
    assert err < max(3.0, 0.1 * float(case.core.sum()) * ml)
