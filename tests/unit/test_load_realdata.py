"""load_study on real scanner series: the right volumes, ADC in 1e-6 mm^2/s, slice sources in order.

The strongest real-data check of units and geometry: where the scanner sent an ADC map, our ADC
computed as ln(S0/S)/b from its own b0 and high-b images must agree with it voxel by voxel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from worker.pipeline.classify import classify_folder, select_inputs
from worker.pipeline.load import compute_adc, load_study, same_grid

FLAIR = "dicom2nifti/siemens_anatomical_001"


def _load(realdata: Path, *folders: str, register: bool = False, same_study_flair: bool = True):
    """Classify and load. No real FLAIR in the pack overlaps a real DWI (different subjects), so by
    default the FLAIR slot is filled with a series of the DWI's own study (its ADC, else the DWI) -
    loading then runs as for a real study; the real FLAIR still proves classification/selection."""
    sel = select_inputs(classify_folder([realdata / f for f in folders]))
    if same_study_flair:
        sel = dataclasses.replace(sel, flair=sel.adc or sel.dwi)
    return sel, load_study(sel, register=register)


def _agreement(study):
    ours = sitk.GetArrayFromImage(compute_adc(study.b0, study.dwi, study.b_high, study.brain))
    scanner = sitk.GetArrayFromImage(study.adc)
    m = (sitk.GetArrayFromImage(study.brain) > 0) & (ours > 0) & (scanner > 0)
    return float(np.median(ours[m] / scanner[m])), float(np.corrcoef(ours[m], scanner[m])[0, 1]), scanner[m]


@pytest.mark.parametrize(
    ("folders", "n_slices"),
    [(("dcm_qa_xa30i", FLAIR), 5), (("dcm_qa_xa30/10_DWI_b0_b2500", "dcm_qa_xa30/11_DWI_ADC", FLAIR), 39)],
    ids=["siemens-classic", "siemens-enhanced"],
)
def test_computed_adc_agrees_with_scanner_adc(realdata: Path, folders, n_slices):
    sel, st = _load(realdata, *folders)
    assert st.dwi.GetSize() == (72, 72, n_slices)
    assert not st.adc_computed and st.b_high == 2500
    for img in (st.b0, st.adc, st.flair, st.brain):
        assert same_grid(img, st.dwi)
    ratio, corr, scanner = _agreement(st)
    assert 0.9 < ratio < 1.1 and corr > 0.8
    # Siemens stores ADC in 1e-6 mm^2/s already; tissue sits in the hundreds to low thousands.
    assert 300 < float(np.median(scanner)) < 2500


def test_dwi_sources_follow_the_grid(realdata: Path):
    sel, st = _load(realdata, "dcm_qa_xa30i", FLAIR)
    refs = st.sources["dwi"]
    assert len(refs) == st.dwi.GetSize()[2]
    for k, ref in enumerate(refs):
        ds = pydicom.dcmread(ref.path, stop_before_pixels=True)
        assert ds.SeriesNumber == 13001 and ref.frame is None  # the TRACEW series, classic files
        assert ds.SOPInstanceUID == ref.sop_instance_uid
        assert np.allclose(st.dwi.TransformIndexToPhysicalPoint((0, 0, k)), [float(v) for v in ds.ImagePositionPatient],
                           atol=0.02)
    assert [pydicom.dcmread(r.path, stop_before_pixels=True).InstanceNumber for r in refs] == [18, 19, 20, 21, 22]
    assert [r.sop_instance_uid for r in st.sources["b0"]] != [r.sop_instance_uid for r in refs]


def test_enhanced_sources_name_frames(realdata: Path):
    _, st = _load(realdata, "dcm_qa_xa30/10_DWI_b0_b2500", "dcm_qa_xa30/11_DWI_ADC", FLAIR)
    refs = st.sources["dwi"]
    assert {r.path.name[:4] for r in refs} == {"0002"}  # the b=2500 volume file
    assert sorted(r.frame for r in refs) == list(range(39))
    assert {r.path.name[:4] for r in st.sources["b0"]} == {"0001"}


def test_adc_is_computed_when_no_adc_series(realdata: Path):
    sel, st = _load(realdata, "dcm_qa_philips_dwi", "dicom2nifti/philips_anatomical_001")
    assert st.adc_computed and sel.adc is None and st.b_high == 1000
    adc = sitk.GetArrayFromImage(st.adc)
    brain = sitk.GetArrayFromImage(st.brain) > 0
    assert 500 < float(np.median(adc[brain & (adc > 0)])) < 1500  # brain at b=1000, 1e-6 mm^2/s
    assert adc.min() >= 0 and adc.max() <= 5000
    assert any("2 images per slice position combined by mean" in w for w in st.warnings)  # b0 + b0.001


def test_b0_is_computed_from_dwi_and_adc_when_missing(realdata: Path):
    sel, st = _load(realdata, "dcm_qa_xa30/12_DWI_TRACEW", "dcm_qa_xa30/11_DWI_ADC", FLAIR)
    assert sel.b0 is None and st.b0_computed
    _, real = _load(realdata, "dcm_qa_xa30/10_DWI_b0_b2500", "dcm_qa_xa30/11_DWI_ADC", FLAIR)
    a, b = sitk.GetArrayFromImage(st.b0), sitk.GetArrayFromImage(real.b0)
    m = (sitk.GetArrayFromImage(real.brain) > 0) & (b > 0)
    # The trace of 80 directions vs one direction's b0-based reconstruction: same scale.
    assert 0.8 < float(np.median(a[m] / b[m])) < 1.25


def test_flair_that_does_not_overlap_the_dwi_is_a_clear_error(realdata: Path):
    """Real DWI and FLAIR from different subjects/scanners: no spatial overlap, so registration cannot
    start; the stage says so instead of surfacing an ITK exception. (Registration quality itself is
    tested on the phantom, which has known motion.)"""
    from common.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="do not overlap"):
        _load(realdata, "dcm_qa_canon_61", "dicom2nifti/philips_anatomical_001", register=True,
              same_study_flair=False)


def test_registration_of_a_same_acquisition_series_stays_at_identity(realdata: Path):
    """Real data, known answer: the scanner's ADC map was computed from these very DWI images, so
    registering it (in the FLAIR slot) onto the b0 must find (almost) no motion, and report quality."""
    _, st = _load(realdata, "dcm_qa_xa30/10_DWI_b0_b2500", "dcm_qa_xa30/11_DWI_ADC", FLAIR, register=True)
    reg = st.registration
    assert reg["rotation_deg"] < 1.0
    m = np.asarray(reg["matrix_dwi_to_flair"])
    centre = np.asarray(reg["center_lps"])
    assert np.linalg.norm(m[:3, :3] @ centre + m[:3, 3] - centre) < 1.0
    assert reg["metric_after"] <= reg["metric_before"] + 1e-3


@pytest.mark.parametrize("folders", [("dcm_qa_xa30/10_DWI_b0_b2500", "dcm_qa_xa30/11_DWI_ADC", FLAIR),
                                     ("dcm_qa_philips_dwi", "dicom2nifti/philips_anatomical_001")],
                         ids=["siemens-39-slices", "philips-32-slices"])
def test_brain_mask_on_real_heads(realdata: Path, folders):
    """On real whole-brain b0 the mask is one head-shaped blob: inside the brain, off the image edge,
    tissue brighter inside than in the excluded rim."""
    _, st = _load(realdata, *folders)
    m = sitk.GetArrayFromImage(st.brain) > 0
    b0 = sitk.GetArrayFromImage(st.b0)
    assert 0.12 < m.mean() < 0.6
    assert not m[:, 0, :].any() and not m[:, -1, :].any() and not m[:, :, 0].any() and not m[:, :, -1].any()
    from scipy import ndimage

    assert ndimage.label(m)[1] == 1
    assert np.median(b0[m]) > 5 * np.median(b0[~m])


@pytest.mark.parametrize(
    ("folders", "b_high", "directions", "adc_computed", "why"),
    [(("dcm_qa_xa30/10_DWI_b0_b2500", "dcm_qa_xa30/11_DWI_ADC"), 2500.0, 1, False, "b = 2500"),
     (("dcm_qa_philips_dwi/701_DTI_b0_b1000_b0.001",), 1000.0, 1, True, "1 diffusion direction")],
    ids=["siemens-b2500-scanner-adc", "philips-one-direction"],
)
def test_adc_the_core_convention_does_not_fit_is_named(realdata: Path, folders, b_high, directions, adc_computed,
                                                         why):
    """Two real volunteers' brains with no visible lesion: the scanner's ADC from b = 2500 and an ADC
    computed from one b = 1000 direction. The ADC < 620 rule calls over 50 mL of core on each (the
    premise: normal ADC is lower at high b, and white matter across a single gradient is dark), and
    the confidence's diffusion part is 0 and says why, so such a study gets no DEFUSE-3 call."""
    from models.confidence import diffusion_part
    from worker.pipeline.core import segment_core

    sel, st = _load(realdata, *folders, FLAIR)
    assert (st.b_high, st.dwi_directions, st.adc_computed) == (b_high, directions, adc_computed)
    assert any("the confidence is lowered" in w for w in st.warnings), st.warnings
    arr = {k: sitk.GetArrayFromImage(getattr(st, k)) for k in ("adc", "dwi", "brain")}
    spacing = tuple(float(v) for v in st.dwi.GetSpacing()[::-1])
    core = segment_core(arr["adc"], arr["dwi"], arr["brain"] > 0, spacing).mask
    assert core.sum() * np.prod(spacing) / 1000 > 50
    part, reasons = diffusion_part({"b_high": st.b_high, "dwi_directions": st.dwi_directions,
                                    "adc_computed": st.adc_computed})
    assert part == 0.0 and why in reasons[0]


def test_six_direction_tensor_counts_six_directions(realdata: Path):
    """GE DTI, 6 directions at b = 1000: their geometric mean is a trace, so the ADC is isotropic."""
    sel, st = _load(realdata, "dcm_qa_ge/01_Ax_DWI_TENSOR_R2", FLAIR)
    assert not sel.dwi.is_trace and st.dwi_directions == 6 and st.b_high == 1000


def test_directions_ignore_the_gradient_sign_and_frames_without_one() -> None:
    """g and -g are one diffusion direction; frames that carry no gradient (an unrecognised trace) add none."""
    from common.dicomio.frames import FrameInfo
    from common.dicomio.volume import SliceRef
    from worker.pipeline.load import diffusion_directions

    def slice_of(*gradients) -> SliceRef:
        frames = tuple(FrameInfo(path=Path("x.dcm"), frame=None, sop_instance_uid=f"1.2.{i}", position=(0, 0, 0),
                                 orientation=None, pixel_spacing=None, slice_thickness=None, rows=4, columns=4,
                                 b_value=1000.0, gradient=g) for i, g in enumerate(gradients))
        return SliceRef(path=Path("x.dcm"), frame=None, sop_instance_uid="1.2", position=(0, 0, 0), contributors=frames)

    x, y, z = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
    assert diffusion_directions([slice_of(x, (-1.0, 0.0, 0.0))], trace=False) == 1
    assert diffusion_directions([slice_of(x, y, z, (0.0, -1.0, 0.0))], trace=False) == 3
    assert diffusion_directions([slice_of(None, None, None)], trace=False) == 0
    assert diffusion_directions([slice_of(x)], trace=True) == 0
