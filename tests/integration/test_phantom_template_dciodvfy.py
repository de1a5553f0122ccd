"""Template-family phantom DICOM (domain-randomised): dciodvfy-clean in every vendor style and form,
same seed -> same bytes, and the DWI lands on the truth grid like the geometric family's."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from phantom.api import make_case, write_dicom_study
from tests.integration.test_phantom_dciodvfy import _sample_files, assert_dciodvfy_clean

pytestmark = pytest.mark.integration


def _case():
    return make_case(3, matrix=64, family="template", randomise=True)


@pytest.fixture(scope="module")
def case():
    return _case()


@pytest.fixture(scope="module")
def studies(case, tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_template_dicom")
    return {(v, e): write_dicom_study(case, root / f"{v}_{int(e)}", v, enhanced=e, split_b=(v == "ge"))
            for v in ("siemens", "ge", "philips") for e in (False, True)}


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_template_dicom_has_no_dciodvfy_errors(studies, vendor, enhanced):
    for f in assert_dciodvfy_clean(_sample_files(studies[(vendor, enhanced)])):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert "SYNTHETIC" in str(ds.get("ImageComments", "")) or "SYNTHETIC" in str(ds.get("StudyDescription", ""))


def test_template_dwi_pixels_and_same_seed_bytes(studies, case, tmp_path):
    d = studies[("siemens", False)]
    first = sorted((d).glob("*DWI*/*.dcm")) or sorted(d.glob("03_*/*.dcm"))
    ds = pydicom.dcmread(first[-1])
    assert ds.Rows == case.grid.shape[1] and float(ds.SliceThickness) == case.acquisition["dwi"]["slice_thickness_mm"]
    assert np.array_equal(ds.pixel_array, np.clip(np.rint(case.dwi[-1]), 0, 65535).astype(ds.pixel_array.dtype))
    again = write_dicom_study(_case(), tmp_path / "again", "ge", enhanced=True, split_b=True)
    ref = studies[("ge", True)]
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.dcm"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.dcm"))
    for rel in files:
        assert (ref / rel).read_bytes() == (again / rel).read_bytes(), rel
