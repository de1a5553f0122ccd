"""Rules as data: validation names the bad rule, sites can override, and synthetic headers hit the
rules the real data does not exercise (DSC with and without a contrast agent, localizers, T1 IR, b0.001).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from common.config import load_settings
from worker.pipeline.classify import classify_folder
from worker.rules import DEFAULT_RULES, RulesError, load_rules, parse_rules

MR = "1.2.840.10008.5.1.4.1.1.4"


def write_mr(folder: Path, n_slices: int = 3, n_times: int = 1, series_uid: str | None = None,
             signal=None, **attrs) -> Path:
    """Write a tiny classic MR series (n_slices x n_times files) with the given attributes.

    ``signal(t)`` scales the pixel values of time point t (default constant)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    k = 0
    for t in range(n_times):
        for z in range(n_slices):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = MR
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = MR
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
            ds.Modality = "MR"
            ds.SeriesInstanceUID = series_uid
            ds.StudyInstanceUID = "1.2.3"
            ds.SeriesNumber = 5
            ds.InstanceNumber = k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
            ds.ImagePositionPatient = [0.0, 0.0, 5.0 * z]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.PixelSpacing = [2.0, 2.0]
            ds.SliceThickness = 5.0
            ds.Rows = ds.Columns = 8
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            scale = 1.0 if signal is None else float(signal(t))
            ds.PixelData = np.full((8, 8), round((1000 + 10 * z) * scale), np.uint16).tobytes()
            if n_times > 1:
                ds.TemporalPositionIdentifier = t + 1
                ds.NumberOfTemporalPositions = n_times
            for key, value in attrs.items():
                setattr(ds, key, value)
            ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
            k += 1
    return folder


GRE_EPI = {"ScanningSequence": ["GR", "EP"], "SequenceVariant": "SK", "EchoTime": 30, "RepetitionTime": 1500}


@pytest.mark.parametrize(
    ("attrs", "n_times", "role", "rule"),
    [
        ({**GRE_EPI, "ContrastBolusAgent": "Gadobutrol"}, 12, "DSC", "dsc-contrast-agent"),
        ({**GRE_EPI, "ImageType": ["ORIGINAL", "PRIMARY", "PERFUSION", "NONE"]}, 12, "DSC", "dsc-perfusion-image-type"),
        # Only 3 of 40 time points arrived: no contrast timing to read, so the description decides.
        ({**GRE_EPI, "SeriesDescription": "ep2d_perf", "NumberOfTemporalPositions": 40}, 3, "DSC", "description-dsc"),
        ({**GRE_EPI, "SeriesDescription": "ep2d_bold_rest", "NumberOfTemporalPositions": 40}, 3, "OTHER",
         "description-bold"),
        ({**GRE_EPI, "NumberOfTemporalPositions": 40}, 3, "OTHER", "epi-without-diffusion-or-contrast"),
        # The whole time series arrived: its signal over time decides DSC vs BOLD (flat = BOLD).
        ({**GRE_EPI, "SeriesDescription": "ep2d_perf"}, 12, "OTHER", "bold-no-bolus"),
        ({"ScanningSequence": ["GR", "IR"], "EchoTime": 2.5, "InversionTime": 900, "RepetitionTime": 2300},
         1, "OTHER", "t1-or-stir-inversion-recovery"),
        ({"ScanningSequence": ["SE", "IR"], "EchoTime": 90, "InversionTime": 2500, "RepetitionTime": 9000},
         1, "FLAIR", "flair-inversion-recovery"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 1, "OTHER", "localizer"),
        ({"SeriesDescription": "t2_tirm_tra_dark-fluid"}, 1, "FLAIR", "description-flair"),
        ({"SeriesDescription": "Ax T2 FLAIR"}, 1, "FLAIR", "description-flair"),
        ({"ScanningSequence": ["SE", "EP"], "DiffusionBValue": 0.001}, 1, "OTHER", "epi-without-diffusion-or-contrast"),
        ({"ScanningSequence": ["SE", "EP"], "DiffusionBValue": 1000.0, "SeriesDescription": "FLAIR"},
         1, "DWI", "diffusion-b-standard"),
    ],
    ids=["dsc-agent", "dsc-imagetype", "dsc-description", "bold-description", "gre-epi-no-contrast", "flat-curve",
         "t1-mprage", "flair-ir", "localizer", "tirm-description", "ax-t2-flair", "b0.001-only", "desc-lies"],
)
def test_synthetic_headers(tmp_path: Path, attrs, n_times, role, rule):
    write_mr(tmp_path / "s", n_times=n_times, **attrs)
    (c,) = classify_folder(tmp_path)
    assert (c.role, c.rule) == (role, rule), c.evidence


def _bolus(t: int) -> float:
    """A first-pass drop of 25 % around time point 8 of 20, then recovery."""
    return 1.0 - 0.25 * np.exp(-0.5 * ((t - 8) / 2.0) ** 2)


def test_contrast_timing_tells_dsc_from_bold(tmp_path: Path):
    write_mr(tmp_path / "dsc", n_times=20, signal=_bolus, **GRE_EPI)  # no agent tag, no description
    write_mr(tmp_path / "bold", n_times=20, signal=lambda t: 1.0 + 0.01 * np.sin(t), **GRE_EPI)
    got = {Path(c.folder).name: c for c in classify_folder(tmp_path)}
    dsc, bold = got["dsc"], got["bold"]
    assert (dsc.role, dsc.rule) == ("DSC", "dsc-bolus-signal-drop")
    assert dsc.features["bolus_drop"] == pytest.approx(0.25, abs=0.03)
    assert (bold.role, bold.rule) == ("OTHER", "bold-no-bolus")
    assert bold.features["bolus_drop"] < 0.03


def test_description_that_contradicts_headers_lowers_confidence(tmp_path: Path):
    write_mr(tmp_path / "a", ScanningSequence=["SE", "EP"], DiffusionBValue=1000.0, SeriesDescription="FLAIR")
    write_mr(tmp_path / "b", ScanningSequence=["SE", "EP"], DiffusionBValue=1000.0, SeriesDescription="DWI")
    a, b = classify_folder(tmp_path)
    assert a.role == b.role == "DWI"
    assert a.confidence < b.confidence
    assert any(r.startswith("conflicts:description-flair") for r, _, _ in a.evidence)


def test_b0_near_zero_is_b0(tmp_path: Path):
    write_mr(tmp_path / "s", n_slices=2, ScanningSequence=["SE", "EP"], DiffusionBValue=0.001,
             series_uid="1.2.3.4")
    write_mr(tmp_path / "s2", n_slices=2, ScanningSequence=["SE", "EP"], DiffusionBValue=1000.0,
             series_uid="1.2.3.5", AcquisitionContrast="DIFFUSION")
    cls = classify_folder(tmp_path)
    assert [f.b_value for f in cls[0].frames] == pytest.approx([0.001, 0.001])
    assert cls[1].b_values == [1000.0]


def _rules_data() -> dict:
    return yaml.safe_load(DEFAULT_RULES.read_text())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["rules"][3]["when"][0].update(field="TI"), r"rule 'colour-image' \(#4\): unknown field 'TI'"),
        (lambda d: d["rules"][0].update(role="PERFUSION"), r"rule 'not-mr' \(#1\): role 'PERFUSION'"),
        (lambda d: d["rules"][1].update(confidence=1.5), r"rule 'secondary-capture' \(#2\): confidence"),
        (lambda d: d["rules"].__setitem__(2, {**d["rules"][2], "name": "not-mr"}), r"duplicate rule name 'not-mr'"),
        (lambda d: d["rules"].pop(), r"last rule must be a catch-all"),
        (lambda d: d["rules"][4]["when"].append({"field": "description", "matches": "("}), r"rule 'localizer' \(#5\): bad regular expression"),
        (lambda d: d["rules"][4]["when"].append({"field": "echo_time", "ge": "long"}), r"rule 'localizer' \(#5\): echo_time ge needs a number"),
        (lambda d: d["rules"][4]["when"].append({"field": "echo_time", "any_of": [1]}), r"operator 'any_of' does not apply"),
        (lambda d: d.update(version=2), r"'version' must be 1"),
    ],
)
def test_validation_names_the_bad_rule(mutate, message):
    data = _rules_data()
    mutate(data)
    with pytest.raises(RulesError, match=message):
        parse_rules(data, "site.yaml")


def test_site_rules_file_from_settings(tmp_path: Path):
    data = _rules_data()
    # A site whose FLAIR is called "DARKWATER" and carries no IR tags.
    data["rules"].insert(-1, {"name": "site-darkwater", "role": "FLAIR", "confidence": 0.8,
                              "why": "local protocol name", "when": [{"field": "description", "matches": "darkwater"}]})
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(data))
    settings = load_settings(rules_file=str(site))
    rules = load_rules(settings.rules_file)
    write_mr(tmp_path / "dicom" / "s", SeriesDescription="ax DARKWATER 5mm")
    (default,) = classify_folder(tmp_path / "dicom")
    (site_c,) = classify_folder(tmp_path / "dicom", rules)
    assert default.role == "OTHER"
    assert (site_c.role, site_c.rule) == ("FLAIR", "site-darkwater")


def test_missing_rules_file_is_named(tmp_path: Path):
    with pytest.raises(RulesError, match="does not exist"):
        load_rules(tmp_path / "nope.yaml")
