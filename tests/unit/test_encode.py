"""Encode: every output object is valid DICOM (dciodvfy, no errors) and reads back to our values.

Sources are built in memory (tests/unit/test_encode_sources.py): classic single-frame DWI with two
b-values, and the same converted to an enhanced multi-frame object.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.conftest import require_tool
from tests.unit.test_encode_sources import make_study
from worker.pipeline.encode import SERIES, EncodeInput, Geometry, encode_outputs

SHAPE = (8, 48, 48)
SPACING = (3.0, 3.0, 5.0)


def make_input(enhanced: bool, job_version: int = 1, study=None) -> tuple[EncodeInput, list]:
    high, dwi_all, flair, origin = study or make_study(SHAPE, SPACING, enhanced=enhanced)
    geo = Geometry(origin=tuple(map(float, origin)), spacing=SPACING, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                   shape_zyx=SHAPE)
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]]
    brain = ((y - 24) ** 2 / 20**2 + (x - 24) ** 2 / 17**2) < 1
    tmax = np.where(brain, 1 + 13 * np.exp(-((y - 22) ** 2 + (x - 15) ** 2 + 4 * (z - 4) ** 2) / 90.0), 0)
    tmax = (tmax + rng.normal(0, 0.05, SHAPE) * brain).astype(np.float32)
    sd = (0.3 + 0.05 * tmax).astype(np.float32) * brain
    core = brain & (((y - 22) ** 2 + (x - 15) ** 2) < 16) & (z > 2) & (z < 6)
    dwi = brain * (500.0 + rng.normal(0, 20, SHAPE)) + core * 600
    vml = float(np.prod(SPACING)) / 1000
    t6, t10 = (tmax > 6) & brain, (tmax > 10) & brain
    m = {"core_ml": core.sum() * vml, "tmax6_ml": t6.sum() * vml, "tmax10_ml": t10.sum() * vml}
    m["mismatch_ml"] = float(((t6 & ~core).sum()) * vml)
    m["mismatch_ratio"] = m["tmax6_ml"] / m["core_ml"]
    m["hir"] = m["tmax10_ml"] / m["tmax6_ml"]
    m["defuse3"] = True
    m["extend"] = True
    inp = EncodeInput(
        study_uid=high[0].StudyInstanceUID, job_version=job_version, geometry=geo, dwi_sources=high,
        flair_sources=flair, dwi=dwi, tmax=tmax, tmax_sd=sd, core=core, brain=brain, measures=m,
        software_version="0.1.0", model_name="demo", model_version="unit", samples=1,
    )
    return inp, [high, dwi_all, flair, origin]


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def _to_our_order(vol: hd.Volume, geo: Geometry) -> np.ndarray:
    """Reorder a highdicom volume's slices to our (z increasing along the DWI normal) order."""
    arr = vol.array
    normal = geo.axes[2]
    pos = [float(np.dot((vol.affine @ np.array([k, 0, 0, 1.0]))[:3], normal)) for k in range(arr.shape[0])]
    ours = [float(np.dot(geo.slice_position(k), normal)) for k in range(geo.shape_zyx[0])]
    index = [int(np.argmin(np.abs(np.asarray(pos) - p))) for p in ours]
    return arr[index]


@pytest.fixture(scope="module", params=["classic", "enhanced"])
def encoded(request, tmp_path_factory):
    inp, study = make_input(request.param == "enhanced")
    out = tmp_path_factory.mktemp(f"enc_{request.param}")
    result = encode_outputs(inp, out)
    return inp, study, result


def test_every_object_passes_dciodvfy(encoded):
    _, _, result = encoded
    kinds = {o.kind for o in result.objects}
    assert kinds == set(SERIES)
    overlays = [o.path for o in result.objects if o.kind == "overlay"]
    for obj in result.objects:
        if obj.kind == "overlay" and obj.path not in (overlays[0], overlays[-1]):
            continue  # the first overlay is built by highdicom, the others cloned from it
        errors = dciodvfy_errors(Path(obj.path))
        assert not errors, f"{obj.kind}: {errors}"


def test_common_header_marks_synthetic_and_references_sources(encoded):
    inp, (high, dwi_all, flair, _), result = encoded
    dwi_series = high[0].SeriesInstanceUID
    flair_series = flair[0].SeriesInstanceUID
    series_uids = set()
    for obj in result.objects:
        ds = pydicom.dcmread(obj.path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == inp.study_uid
        assert ds.SeriesInstanceUID not in (dwi_series, flair_series)
        assert ds.SeriesDescription.startswith("SYNTHETIC")
        assert ds.Manufacturer == "synthperf"
        versions = list(ds.SoftwareVersions) if ds["SoftwareVersions"].VM > 1 else [ds.SoftwareVersions]
        assert any("synthperf 0.1.0" in v for v in versions) and any("demo unit" in v for v in versions)
        assert ds.PatientID == high[0].PatientID
        series_uids.add((obj.kind, ds.SeriesInstanceUID))
        if obj.kind in ("tmax", "tmax_sd", "tmax_int", "seg"):
            refs = [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence]
            # the SEG cites the DWI alone (OHIF-2 in docs/conformance.md); maps cite the DWI first
            assert refs == [dwi_series] if obj.kind == "seg" else refs == [dwi_series, flair_series]
            assert ds.BodyPartExamined == "BRAIN"
        if obj.kind == "seg":
            # unpaired brain: what pixelmed's Laterality condition asks for, without Series Laterality
            assert ds.ImageLaterality == "U" and "Laterality" not in ds
        if obj.kind in ("overlay", "summary"):
            assert ds.BurnedInAnnotation == "YES"
            cited = {r.ReferencedSOPInstanceUID for r in ds.get("SourceImageSequence", [])}
            dwi_uids, flair_uids = {d.SOPInstanceUID for d in dwi_all}, {f.SOPInstanceUID for f in flair}
            assert cited <= dwi_uids | flair_uids
            if obj.kind == "summary":
                assert cited & dwi_uids and cited & flair_uids
    # each kind is its own series
    assert len({uid for _, uid in series_uids}) == len(SERIES)


def test_parametric_maps_read_back_with_our_values(encoded):
    inp, _, result = encoded
    by_kind = {o.kind: o for o in result.objects}
    tmax = hd.imread(by_kind["tmax"].path)
    assert tmax.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    vol = _to_our_order(tmax.get_volume(), inp.geometry)
    np.testing.assert_array_equal(vol.astype(np.float32), inp.tmax)
    rwvm = tmax.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "s"
    assert rwvm.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    sd = _to_our_order(hd.imread(by_kind["tmax_sd"].path).get_volume(), inp.geometry)
    np.testing.assert_array_equal(sd.astype(np.float32), inp.tmax_sd.astype(np.float32))
    intmap = hd.imread(by_kind["tmax_int"].path)
    assert intmap.BitsAllocated == 16
    iv = _to_our_order(intmap.get_volume(), inp.geometry)  # highdicom applies the RWVM: seconds
    np.testing.assert_allclose(iv, np.clip(inp.tmax, 0, None), atol=0.051)  # 0.1 s steps


def test_segmentation_reads_back_and_references_dwi(encoded):
    inp, (high, _all, flair, _), result = encoded
    seg_obj = next(o for o in result.objects if o.kind == "seg")
    seg = hd.seg.segread(seg_obj.path)
    assert seg.SegmentationType == "BINARY"
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels[0].startswith("Infarct core") and "Tmax>6" in labels[1] and "Tmax>10" in labels[2]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    vol = _to_our_order(seg.get_volume(combine_segments=False), inp.geometry)
    np.testing.assert_array_equal(vol[..., 0].astype(bool), inp.core)
    np.testing.assert_array_equal(vol[..., 1].astype(bool), inp.tmax6)
    np.testing.assert_array_equal(vol[..., 2].astype(bool), inp.tmax10)
    # every frame's derivation references include a DWI source at its position (FLAIR may join)
    dwi_uids = {d.SOPInstanceUID for d in high}
    flair_uids = {d.SOPInstanceUID for d in flair}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        referenced = {
            src.ReferencedSOPInstanceUID
            for der in frame.DerivationImageSequence for src in der.SourceImageSequence
        }
        assert referenced & dwi_uids
        assert referenced <= dwi_uids | flair_uids


def test_sr_reports_our_volumes_and_flags(encoded):
    inp, _, result = encoded
    by_kind = {o.kind: o for o in result.objects}
    sr = hd.sr.srread(by_kind["sr"].path)
    seg_uid = pydicom.dcmread(by_kind["seg"].path, stop_before_pixels=True).SOPInstanceUID
    vols = {}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    for g in groups:
        assert g.referenced_segment.referenced_sop_instance_uid == seg_uid
    for g in groups[:-1]:
        (m,) = g.get_measurements()
        assert m.unit.value == "mL"
        vols[g.referenced_segment.referenced_segment_numbers[0]] = m.value
    m = inp.measures
    assert vols[1] == pytest.approx(m["core_ml"]) and vols[2] == pytest.approx(m["tmax6_ml"])
    assert vols[3] == pytest.approx(m["tmax10_ml"])
    assert not sr.content.get_image_measurement_groups()
    profile = groups[-1]  # the mismatch profile, on the Tmax>6 s segment
    assert profile.referenced_segment.referenced_segment_numbers == [2]
    values = {x.name.value: x.value for x in profile.get_measurements()}
    assert values["MISMATCH_VOL"] == pytest.approx(m["mismatch_ml"])
    assert values["MISMATCH_RATIO"] == pytest.approx(m["mismatch_ratio"])
    assert values["HIR"] == pytest.approx(m["hir"])
    flags = {q.name.value: q.value.meaning for q in profile.get_qualitative_evaluations()}
    assert flags["DEFUSE3"] == "Yes" and flags["EXTEND"] == "Yes" and flags["SYNTHETIC"] == "Yes"


def test_secondary_captures_are_rgb_with_burned_in_warning_band(encoded):
    inp, _, result = encoded
    overlays = [o for o in result.objects if o.kind == "overlay"]
    assert len(overlays) == SHAPE[0]
    ds = pydicom.dcmread(overlays[0].path)
    assert ds.PhotometricInterpretation == "RGB" and ds.BitsAllocated == 8 and ds.SamplesPerPixel == 3
    px = ds.pixel_array
    band = px[2:26, :, :].reshape(-1, 3)
    # the warning banner is dark red with white text on every SC
    assert (band[:, 0] > 150).mean() > 0.6 and (band.min(axis=1) > 200).any()
    last = pydicom.dcmread(overlays[-1].path)
    assert last.InstanceNumber == SHAPE[0] and last.file_meta.MediaStorageSOPInstanceUID == last.SOPInstanceUID
    assert len({o.sop_instance_uid for o in overlays}) == SHAPE[0]
    assert not np.array_equal(last.pixel_array, px)  # each slice its own picture
    summary = pydicom.dcmread(next(o.path for o in result.objects if o.kind == "summary"))
    assert summary.pixel_array.shape == (768, 1024, 3)


def test_uids_are_deterministic_per_job_version(tmp_path):
    inp, study = make_input(False)
    a = encode_outputs(inp, tmp_path / "a")
    again, _ = make_input(False, study=study)
    b = encode_outputs(again, tmp_path / "b")
    v2, _ = make_input(False, job_version=2, study=study)
    c = encode_outputs(v2, tmp_path / "c")
    uids = lambda r: [o.sop_instance_uid for o in r.objects]  # noqa: E731
    assert uids(a) == uids(b)
    assert not set(uids(a)) & set(uids(c))


def test_bad_inputs_are_named():
    inp, study = make_input(False)
    with pytest.raises(Exception, match="tmax has shape"):
        EncodeInput(**{**inp.__dict__, "tmax": inp.tmax[:-1], "tmax6": None, "tmax10": None})
    with pytest.raises(Exception, match="dwi_sources is empty"):
        EncodeInput(**{**inp.__dict__, "dwi_sources": [], "tmax6": None, "tmax10": None})
