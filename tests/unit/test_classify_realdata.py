"""Every series under ../shared/realdata gets the role its headers justify.

Each row: folder, expected role, expected b-values (DWI only), the rule that must decide it, and the
header evidence (inspected with pydicom) that justifies the role. The traps from issue 5 are here:
ASL perfusion-weighted and relCBF are not DSC, BOLD is not DSC, FA / colour FA / tensor b0 are not
DWI, Philips' DiffusionBValue=0 on a FLAIR does not make it DWI, and inversion-recovery T2 series with
no SeriesDescription are FLAIR.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from common.errors import InputMissingError
from worker.pipeline.classify import classify_folder, select_inputs

# folder, role, b-values, deciding rule, header evidence
EXPECTED = [
    # --- Siemens XA30 enhanced multi-frame
    ("dcm_qa_xa30/10_DWI_b0_b2500", "DWI", [0, 2500], "diffusion-b-standard",
     "per-frame MRDiffusionSequence DiffusionBValue 0 (NONE) and 2500 (BMATRIX); FrameType DIFFUSION"),
    ("dcm_qa_xa30/11_DWI_ADC", "ADC", [], "adc-image-type",
     "FrameType DERIVED\\PRIMARY\\DIFFUSION\\ADC"),
    ("dcm_qa_xa30/12_DWI_TRACEW", "DWI", [2500], "diffusion-b-standard",
     "MRDiffusionSequence b=2500 DiffusionDirectionality ISOTROPIC; FrameType TRACEW"),
    ("dcm_qa_xa30/13_DWI_FA", "OTHER", [], "derived-tensor-map",
     "FrameType ...\\FA; DiffusionAnisotropyType FRACTIONAL (trap: FA is not DWI)"),
    ("dcm_qa_xa30/14_DWI_ColFA", "OTHER", [], "colour-image",
     "Enhanced MR Color Image SOP class, PhotometricInterpretation RGB (trap: colour FA is not DWI)"),
    ("dcm_qa_xa30/25_ASL", "OTHER", [], "asl",
     "per-frame MRArterialSpinLabelingSequence ASLContext M_ZERO_SCAN/LABEL/CONTROL; ImageType ASL"),
    ("dcm_qa_xa30/27_ASL_PerfusionWeighted", "OTHER", [], "asl",
     "ImageType DERIVED\\PRIMARY\\ASL\\SUBTRACTION, AcquisitionContrast PERFUSION (trap: ASL is not DSC)"),
    ("dcm_qa_xa30/28_ASL_relCBF", "OTHER", [], "asl",
     "ImageType ...\\ASL\\RCBF, AcquisitionContrast PERFUSION (trap: relCBF is not DSC)"),
    ("dcm_qa_xa30/7_BOLD", "OTHER", [], "fmri-image-type",
     "FrameType ORIGINAL\\PRIMARY\\FMRI; 20 temporal positions, GRE-EPI TE 30 (trap: BOLD is not DSC)"),
    # --- Siemens XA30 classic ("interoperability")
    ("dcm_qa_xa30i/11001_DWI_b0_b2500", "DWI", [0, 2500], "diffusion-b-siemens",
     "no DiffusionBValue; Siemens (0019,100C) B_value 0 and 2500; SequenceName ep_b0 / ep_b2500#1"),
    ("dcm_qa_xa30i/12001_DWI_ADC", "ADC", [], "adc-image-type", "ImageType DERIVED\\PRIMARY\\DIFFUSION\\ADC"),
    ("dcm_qa_xa30i/13001_DWI_TRACEW", "DWI", [2500], "diffusion-b-siemens",
     "(0019,100C)=2500, (0019,100D) ISOTROPIC, ImageType TRACEW, SequenceName ep_b2500t"),
    ("dcm_qa_xa30i/15001_ColFA_SC", "OTHER", [], "secondary-capture",
     "SOP class Secondary Capture, RGB (colour FA)"),
    ("dcm_qa_xa30i/17001_DWI_TENSOR_B0", "OTHER", [], "derived-tensor-map",
     "ImageType DERIVED\\PRIMARY\\DIFFUSION\\TENSOR_B0: a derived tensor output"),
    ("dcm_qa_xa30i/7001_BOLD", "OTHER", [], "description-bold",
     "GRE-EPI (GR EP, epfid2d1_64, TE 30 TR 1000), 20 temporal positions, no ContrastBolusAgent; "
     "no FMRI token in classic ImageType, so SeriesDescription func-bold decides (trap: BOLD is not DSC)"),
    # --- GE classic
    ("dcm_qa_ge/01_Ax_DWI_TENSOR_R2", "DWI", [0, 1000], "diffusion-b-standard",
     "DiffusionBValue 1000 on 12 of 14 files; GE (0043,1039) [0|1000, 8, 0, 0]; EP SE"),
    ("dcm_qa_ge/2_Ax_fMRI_HB8_72sl", "OTHER", [], "description-bold",
     "EP GR, ImageType EPI, 60 temporal positions, GE (0043,1039) b=0 only, no contrast agent"),
    # --- Philips classic DWI
    ("dcm_qa_philips_dwi/701_DTI_b0_b1000_b0.001", "DWI", [0, 1000], "diffusion-b-standard",
     "DiffusionBValue and (2001,1003) 0, 1000 and 0.001 (b 0.001 is b0)"),
    # --- Canon classic DWI
    ("dcm_qa_canon_61/3000_DTI_classic_b0_b1500", "DWI", [0, 1500], "diffusion-b-standard",
     "DiffusionBValue 0 and 1500; SE EP"),
    # --- dicom2nifti test data (anonymised: no SeriesDescription)
    ("dicom2nifti/ge_dti_001", "DWI", [0, 1000], "diffusion-b-ge",
     "no standard b-value; GE (0043,1039) [0,8,0,0] and [1000,8,0,0]"),
    ("dicom2nifti/siemens_anatomical_001", "FLAIR", [], "flair-inversion-recovery",
     "no description; ScanningSequence SE\\IR, TI 2200, TE 394 (trap: IR T2 without description)"),
    ("dicom2nifti/philips_anatomical_001", "FLAIR", [], "flair-inversion-recovery",
     "no description; ScanningSequence IR, TI 1650, TE 387; DiffusionBValue 0 is not diffusion evidence"),
    ("dicom2nifti/hyperfine_anatomical_001", "FLAIR", [], "flair-acquisition-contrast",
     "enhanced MR, AcquisitionContrast FLUID_ATTENUATED, InversionRecovery YES TI 1400 TE 194"),
    ("dicom2nifti/philips_enhanced_dti_001", "DWI", [0, 1300], "diffusion-b-standard",
     "enhanced MR, per-frame MRDiffusionSequence b 0 (NONE) and 1300 (DIRECTIONAL)"),
    ("dicom2nifti/generic_compressed_j2k_001", "FLAIR", [], "flair-inversion-recovery",
     "JPEG 2000 lossless; SE\\IR TI 2200 TE 394, no description"),
    ("dicom2nifti/generic_compressed_jpeg_001", "FLAIR", [], "flair-inversion-recovery",
     "JPEG lossless SV1; SE\\IR TI 2200 TE 394, no description"),
    ("dicom2nifti/generic_compressed_jpegls_001", "FLAIR", [], "flair-inversion-recovery",
     "JPEG-LS lossless; SE\\IR TI 2200 TE 394, no description"),
    ("dicom2nifti/generic_compressed_rle_001", "FLAIR", [], "flair-inversion-recovery",
     "RLE lossless; SE\\IR TI 2200 TE 394, no description"),
] + [
    # --- dcm_qa_ts: one Siemens mosaic GRE-EPI image in nine transfer syntaxes
    (f"dcm_qa_ts/{name}", "OTHER", [], "epi-without-diffusion-or-contrast",
     "ScanningSequence EP, SequenceName *epfid2d1_64 (GRE-EPI), TE 30, MOSAIC, one time point, no b-value")
    for name in ("ts1_explicit_le", "ts2_implicit_le", "ts3_explicit_be", "ts4_rle", "ts5_jpeg_lossless_dcmtk",
                 "ts6_jpeg_lossless_gdcm", "ts7_jpegls_gdcm", "ts8_jpegls_dcmtk", "ts9_j2k_lossless")
]


@pytest.fixture(scope="module")
def classified(realdata: Path):
    return {str(Path(c.folder).relative_to(realdata)): c for c in classify_folder(realdata)}


def test_every_realdata_series_is_in_the_table(classified):
    # The table covers every series found, so a new folder in realdata fails here until it is judged.
    assert sorted(classified) == sorted(row[0] for row in EXPECTED)


@pytest.mark.parametrize(("folder", "role", "b_values", "rule", "evidence"), EXPECTED, ids=[r[0] for r in EXPECTED])
def test_role_from_header_evidence(classified, folder, role, b_values, rule, evidence):
    c = classified[folder]
    assert c.role == role, f"{folder}: {c.role} by {c.rule} {c.evidence} (expected {role}: {evidence})"
    assert c.rule == rule, c.evidence
    assert c.b_values == [float(b) for b in b_values]
    assert c.evidence and c.evidence[0][0] == rule
    assert 0.5 <= c.confidence <= 0.99


def test_anonymised_flair_really_has_no_description(realdata: Path):
    """The IR-T2 trap only means something if the headers carry no description."""
    for folder in ("dicom2nifti/siemens_anatomical_001", "dicom2nifti/philips_anatomical_001"):
        f = sorted((realdata / folder).iterdir())[0]
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert not str(ds.get("SeriesDescription", "") or "").strip()
        assert not str(ds.get("ProtocolName", "") or "").strip()


def test_trace_flag(classified):
    assert classified["dcm_qa_xa30/12_DWI_TRACEW"].is_trace
    assert classified["dcm_qa_xa30i/13001_DWI_TRACEW"].is_trace
    assert not classified["dcm_qa_xa30/10_DWI_b0_b2500"].is_trace
    assert not classified["dcm_qa_ge/01_Ax_DWI_TENSOR_R2"].is_trace


def test_selection_reports_the_missing_flair(realdata: Path):
    cls = classify_folder(realdata / "dcm_qa_xa30")
    with pytest.raises(InputMissingError, match="no FLAIR: only DWI and ADC arrived"):
        select_inputs(cls)


def test_selection_prefers_trace_and_scanner_adc(realdata: Path):
    cls = classify_folder([realdata / "dcm_qa_xa30i", realdata / "dicom2nifti" / "siemens_anatomical_001"])
    sel = select_inputs(cls)
    assert sel.b_high == 2500
    assert sel.dwi.is_trace and sel.dwi.series_number == 13001
    assert sel.b0 is not None and sel.b0.series_number == 11001
    assert sel.adc is not None and sel.adc.series_number == 12001
    assert sel.flair.role == "FLAIR"
    assert len(sel.high_b_frames()) == 5 and len(sel.b0_frames()) == 5


def test_selection_without_adc_says_it_will_compute_it(realdata: Path):
    cls = classify_folder([realdata / "dcm_qa_philips_dwi", realdata / "dicom2nifti" / "philips_anatomical_001"])
    sel = select_inputs(cls)
    assert sel.adc is None and sel.b_high == 1000
    assert any("ADC is computed" in w for w in sel.warnings)
    # b0 and the 0.001 repeats are all b0 frames: 2 per slice x 32 slices
    assert len(sel.b0_frames()) == 64


def test_selection_with_no_dwi(realdata: Path):
    cls = classify_folder(realdata / "dicom2nifti" / "hyperfine_anatomical_001")
    with pytest.raises(InputMissingError, match="no DWI: only FLAIR arrived"):
        select_inputs(cls)
