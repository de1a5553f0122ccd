"""Phantom studies in every vendor style: classification, selection, loading and registration.

Each phantom study (phantom.api.write_dicom_study) writes a manifest (study.json) naming every
series' role. The table below gives, per vendor header style and form, the rule that must decide each
role and the header evidence the phantom writer puts there (checked with pydicom). Then the selected
inputs load onto the DWI grid with the phantom's own DWI and ADC values, and the FLAIR registration
recovers the known motion within 1 mm and 1 degree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import small_scale
from worker.pipeline.classify import classify_folder, select_inputs
from worker.pipeline.load import load_study, same_grid

phantom_api = pytest.importorskip("phantom.api")

ROLE = {"localizer": "OTHER", "t1": "OTHER", "dwi": "DWI", "dwi_b0": "DWI", "adc": "ADC", "flair": "FLAIR",
        "dsc": "DSC"}

# (vendor, enhanced) -> {manifest role: (deciding rule, header evidence written by the phantom)}
COMMON = {
    "t1": ("t1-short-te-tr", "SE, TE 9.5 ms, TR 550 ms, no EPI"),
    "adc": ("adc-image-type", "ImageType/FrameType token ADC"),
}
CLASSIC = {
    "siemens": {
        "localizer": ("localizer-three-planes", "one series, three slice orientations, GR TR 8.6"),
        "dwi": ("diffusion-b-siemens", "no DiffusionBValue; (0019,100C) B_value 0 / 1000"),
        "dwi_b0": ("diffusion-b0-imagetype", "ImageType ...DIFFUSION, (0019,100C)=0 only"),
        "flair": ("flair-inversion-recovery", "SE\\IR, TI 2300-2500, TE 85-95"),
        "dsc": ("dsc-perfusion-image-type", "EP GRE time series, ImageType PERFUSION"),
    },
    "ge": {
        "localizer": ("localizer", "ImageType ORIGINAL\\PRIMARY\\LOCALIZER"),
        "dwi": ("diffusion-b-ge", "(0043,1039) slop_int_6 = 1000, no DiffusionBValue"),
        "dwi_b0": ("diffusion-b0-se-epi", "EP\\SE, no IR, (0043,1039) b=0 only"),
        "flair": ("flair-inversion-recovery", "SE\\IR, TI 2300-2500, TE 85-95"),
        "dsc": ("dsc-bolus-signal-drop", "EP\\GR time series, ImageType ORIGINAL\\PRIMARY\\OTHER, no "
                "contrast agent: the first-pass signal drop (contrast timing) decides"),
    },
    "philips": {
        "localizer": ("localizer-three-planes", "SURVEY: one series, three orientations"),
        "dwi": ("diffusion-b-standard", "DiffusionBValue 0/1000 and (2001,1003)"),
        "dwi_b0": ("diffusion-b0-philips", "ScanningSequence SE (no EP), (2001,1003)=0, no IR"),
        "flair": ("flair-inversion-recovery", "SE\\IR, TI 2300-2500, TE 85-95"),
        "dsc": ("dsc-bolus-signal-drop", "EP\\GR time series with no contrast agent or PERFUSION tag: the "
                "first-pass signal drop of the central slice (contrast timing) tells DSC from BOLD"),
    },
}
ENHANCED = {
    "localizer": {"siemens": ("localizer-three-planes", "three orientations"), "ge": ("localizer", "LOCALIZER"),
                  "philips": ("localizer-three-planes", "three orientations")},
    "dwi": ("diffusion-b-standard", "per-frame MRDiffusionSequence b 0 / 1000"),
    "dwi_b0": ("diffusion-contrast-b0", "AcquisitionContrast DIFFUSION, MRDiffusionSequence b 0"),
    "flair": ("flair-acquisition-contrast", "FrameType AcquisitionContrast FLUID_ATTENUATED"),
    "dsc": ("dsc-perfusion-image-type", "EchoPlanarPulseSequence YES, GRADIENT, FrameType PERFUSION, 60 positions"),
}


def expected_rule(vendor: str, enhanced: bool, role: str) -> str:
    if role in COMMON:
        return COMMON[role][0]
    if not enhanced:
        return CLASSIC[vendor][role][0]
    entry = ENHANCED[role]
    return entry[vendor][0] if isinstance(entry, dict) else entry[0]


FORMS = [(v, e, s) for v in ("siemens", "ge", "philips") for e in (False, True) for s in (False, True)]
if small_scale():
    FORMS = [("siemens", False, True), ("ge", True, False), ("philips", False, False), ("philips", True, True)]


@pytest.fixture(scope="module")
def cases():
    # DSC only in the enhanced forms (one file per time point; classic would be 1500 files).
    return {False: phantom_api.make_case(11, matrix=64), True: phantom_api.make_case(11, matrix=64, with_dsc=True)}


@pytest.mark.slow
@pytest.mark.parametrize(("vendor", "enhanced", "split_b"), FORMS, ids=[f"{v}-{'enh' if e else 'classic'}"
                                                                    f"{'-split' if s else ''}" for v, e, s in FORMS])
def test_phantom_study(tmp_path: Path, cases, vendor: str, enhanced: bool, split_b: bool):
    case = cases[enhanced]
    out = phantom_api.write_dicom_study(case, tmp_path / "study", vendor, enhanced=enhanced, split_b=split_b)
    manifest = json.loads((Path(out) / "study.json").read_text())
    classified = {Path(c.folder).name: c for c in classify_folder(out)}
    assert sorted(classified) == sorted(s["folder"] for s in manifest["series"])
    for s in manifest["series"]:
        c = classified[s["folder"]]
        assert c.role == ROLE[s["role"]], (s["folder"], c.evidence)
        assert c.rule == expected_rule(vendor, enhanced, s["role"]), (s["folder"], c.evidence)
        if s["role"] in ("dwi", "dwi_b0"):
            assert c.b_values == sorted({0.0 if b <= 50 else float(b) for b in s["b_values"]})

    sel = select_inputs(list(classified.values()))
    assert sel.b_high == 1000.0 and sel.adc is not None
    if split_b:
        assert sel.b0 is not sel.dwi
    st = load_study(sel)
    # Volumes on the phantom's DWI grid with its values (writer quantisation only).
    assert st.dwi.GetSize() == case.grid.shape[::-1]
    assert np.allclose(st.dwi.GetOrigin(), case.grid.origin, atol=0.05)
    for img in (st.b0, st.adc, st.flair, st.brain):
        assert same_grid(img, st.dwi)
    brain = case.brain
    dwi = sitk.GetArrayFromImage(st.dwi)
    assert np.corrcoef(dwi.ravel(), case.dwi.ravel())[0, 1] > 0.999
    adc = sitk.GetArrayFromImage(st.adc)
    assert float(np.median(np.abs(adc[brain] - case.adc[brain]))) < 5.0  # 1e-6 mm^2/s
    assert len(st.sources["dwi"]) == case.grid.shape[0]
    assert np.allclose([r.position for r in st.sources["dwi"]], case.grid.slice_positions(), atol=0.05)
    # Registration recovers the known motion.
    truth = np.asarray(case.flair_motion["matrix_dwi_to_flair_world"])
    est = np.asarray(st.registration["matrix_dwi_to_flair"])
    r = truth[:3, :3].T @ est[:3, :3]
    assert np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))) < 1.0
    centre = np.asarray(case.flair_motion["center_lps"])
    assert np.linalg.norm((truth[:3, :3] - est[:3, :3]) @ centre + truth[:3, 3] - est[:3, 3]) < 1.0
    assert st.registration["metric_after"] < st.registration["metric_before"]
    mask = sitk.GetArrayFromImage(st.brain) > 0
    assert 2 * (mask & brain).sum() / (mask.sum() + brain.sum()) > 0.85


DSC_CLASSIC = ["philips"] if small_scale() else ["siemens", "ge", "philips"]


@pytest.mark.slow
@pytest.mark.parametrize("vendor", DSC_CLASSIC)
def test_classic_dsc_series(tmp_path: Path, cases, vendor: str):
    """Classic DSC (one file per slice and time point). Philips style carries no contrast agent and no
    PERFUSION token, so contrast timing from the pixels decides - not the description."""
    out = phantom_api.write_dicom_study(cases[True], tmp_path / "study", vendor, enhanced=False, split_b=False)
    manifest = json.loads((Path(out) / "study.json").read_text())
    (dsc_folder,) = [s["folder"] for s in manifest["series"] if s["role"] == "dsc"]
    (c,) = [c for c in classify_folder(Path(out) / dsc_folder)]
    assert (c.role, c.rule) == ("DSC", expected_rule(vendor, False, "dsc")), c.evidence
    assert c.features["temporal_positions"] >= 40
    if vendor == "philips":
        assert c.features["contrast_agent"] is None and "PERFUSION" not in c.features["image_type"]
        assert c.features["bolus_drop"] >= 0.06
