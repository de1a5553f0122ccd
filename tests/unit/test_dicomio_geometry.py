"""Volumes get the right origin/spacing/direction, slices sort along the normal, and bad stacks say why."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from common.dicomio import build_volume, group_series
from common.dicomio.frames import frames_of
from common.dicomio.geometry import sort_stack
from common.errors import InvalidInputError
from tests.unit.test_classify_rules import write_mr

OBLIQUE = [
    ("dcm_qa_philips_dwi/701_DTI_b0_b1000_b0.001", 1000.0),  # classic, oblique, interleaved b per file order
    ("dcm_qa_ge/01_Ax_DWI_TENSOR_R2", 1000.0),  # classic, strongly oblique, 6 directions per slice
    ("dcm_qa_xa30i/13001_DWI_TRACEW", 2500.0),  # classic Siemens, oblique
    ("dcm_qa_xa30/12_DWI_TRACEW", 2500.0),  # enhanced multi-frame
]


@pytest.mark.parametrize(("folder", "b"), OBLIQUE)
def test_image_geometry_matches_dicom(realdata: Path, folder: str, b: float):
    (s,) = group_series([realdata / folder])
    frames = [f for f in s.frames if f.b_value is not None and abs(f.b_value - b) < 1]
    random.Random(0).shuffle(frames)  # input order must not matter
    vol = build_volume(frames, folder, combine="single" if "TRACEW" in folder else "geomean")
    img = vol.image
    assert img.GetSize()[2] == len(vol.slices)
    row = np.asarray(frames[0].orientation[:3])
    col = np.asarray(frames[0].orientation[3:])
    normal = np.cross(row, col)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    assert np.allclose(d[:, 0], row, atol=1e-5) and np.allclose(d[:, 1], col, atol=1e-5)
    assert np.allclose(d[:, 2], normal / np.linalg.norm(normal), atol=1e-5)
    ps = frames[0].pixel_spacing
    assert img.GetSpacing()[:2] == pytest.approx((ps[1], ps[0]))
    dist = [float(np.dot(ref.position, normal)) for ref in vol.slices]
    assert dist == sorted(dist)
    arr = sitk.GetArrayFromImage(img)
    pixels: dict[Path, np.ndarray] = {}
    for k, ref in enumerate(vol.slices):
        # slice k's origin is that slice's ImagePositionPatient
        assert np.allclose(img.TransformIndexToPhysicalPoint((0, 0, k)), ref.position, atol=0.02)
        # pixel (column i, row j) sits at IPP + i * colspacing * row + j * rowspacing * col
        i, j = 5, 9
        expect = np.asarray(ref.position) + i * ps[1] * row + j * ps[0] * col
        assert np.allclose(img.TransformIndexToPhysicalPoint((i, j, k)), expect, atol=0.02)
        if len(ref.contributors) == 1:
            if ref.path not in pixels:
                pixels[ref.path] = pydicom.dcmread(ref.path).pixel_array
            px = pixels[ref.path] if ref.frame is None else pixels[ref.path][ref.frame]
            slope = float(ref.contributors[0].rescale[0])
            icpt = float(ref.contributors[0].rescale[1])
            assert np.allclose(arr[k], px * slope + icpt)


def test_enhanced_slice_refs_name_file_and_frame(realdata: Path):
    (s,) = group_series([realdata / "dcm_qa_xa30/10_DWI_b0_b2500"])
    b2500 = [f for f in s.frames if f.b_value == 2500.0]
    vol = build_volume(b2500, "b2500", combine="single")
    assert len(vol.slices) == 39
    assert len({r.path for r in vol.slices}) == 1  # all from the second file
    assert sorted(r.frame for r in vol.slices) == list(range(39))
    ds = pydicom.dcmread(vol.slices[0].path, stop_before_pixels=True)
    assert vol.slices[0].sop_instance_uid == ds.SOPInstanceUID
    pf = ds.PerFrameFunctionalGroupsSequence[vol.slices[7].frame]
    assert np.allclose(pf.PlanePositionSequence[0].ImagePositionPatient, vol.slices[7].position)


def test_directions_are_geometric_mean(realdata: Path):
    (s,) = group_series([realdata / "dcm_qa_ge/01_Ax_DWI_TENSOR_R2"])
    hi = [f for f in s.frames if f.b_value == 1000.0]
    vol = build_volume(hi, "GE b1000", combine="geomean")
    assert len(vol.slices) == 2 and all(len(r.contributors) == 6 for r in vol.slices)
    assert any("6 images per slice position combined by geometric mean" in w for w in vol.warnings)
    k = 0
    stack = np.stack([pydicom.dcmread(f.path).pixel_array.astype(float) for f in vol.slices[k].contributors])
    expect = np.exp(np.mean(np.log(np.maximum(stack, 1e-3)), axis=0))
    assert np.allclose(sitk.GetArrayFromImage(vol.image)[k], expect, rtol=1e-4)


def test_hyperfine_multiframe_without_per_frame_groups_is_a_stack(realdata: Path):
    (s,) = group_series([realdata / "dicom2nifti/hyperfine_anatomical_001"])
    vol = build_volume(s.frames, "hyperfine")
    assert vol.image.GetSize() == (112, 138, 8)
    assert sorted(r.frame for r in vol.slices) == list(range(8))


# ------------------------------------------------------------------ synthetic stacks with problems
def _series(folder: Path):
    (s,) = group_series([folder])
    return s


def test_missing_slice_is_an_error(tmp_path: Path):
    write_mr(tmp_path / "s", n_slices=6)
    (tmp_path / "s" / "0003.dcm").unlink()
    with pytest.raises(InvalidInputError, match=r"1 slice\(s\) missing .*Resend the complete series"):
        build_volume(_series(tmp_path / "s").frames, "FLAIR")


def test_mixed_orientations_are_an_error(tmp_path: Path):
    write_mr(tmp_path / "s", n_slices=3)
    write_mr(tmp_path / "t", n_slices=1, ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
    frames = _series(tmp_path / "s").frames + _series(tmp_path / "t").frames
    with pytest.raises(InvalidInputError, match="mixed slice orientations"):
        build_volume(frames, "FLAIR")


def test_duplicate_positions_are_an_error_when_one_image_is_expected(tmp_path: Path):
    write_mr(tmp_path / "s", n_slices=3, n_times=2)
    with pytest.raises(InvalidInputError, match="2 images at one slice position"):
        build_volume(_series(tmp_path / "s").frames, "ADC", combine="single")


def test_gantry_tilt_is_a_warning_with_the_angle(tmp_path: Path):
    folder = write_mr(tmp_path / "s", n_slices=5)
    for k, f in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [0.0, 5.0 * k * np.tan(np.radians(12)), 5.0 * k]  # 12 deg tilt about x
        ds.save_as(f)
    vol = build_volume(_series(folder).frames, "CT-like")
    assert any("gantry tilt" in w and "12.0 degrees" in w for w in vol.warnings)


def test_uneven_spacing_warns_or_fails():
    ori = [1, 0, 0, 0, 1, 0]
    slight = sort_stack([[0, 0, z] for z in (0, 5, 10, 15.6, 20.6)], ori, "DWI")
    assert any("uneven slice spacing" in w for w in slight.warnings)
    with pytest.raises(InvalidInputError, match="uneven slice spacing"):
        sort_stack([[0, 0, z] for z in (0, 5, 10, 13, 25.5)], ori, "DWI")


def test_sort_is_along_the_normal_not_z():
    # Sagittal stack: normal is -x for row (0,1,0), col (0,0,-1); slices listed in random order.
    ori = [0, 1, 0, 0, 0, -1]
    xs = [3.0, -1.0, 1.0, 5.0, -3.0]
    geo = sort_stack([[x, 0, 0] for x in xs], ori, "sag")
    assert [xs[i] for i in geo.order] == [5.0, 3.0, 1.0, -1.0, -3.0]
    assert geo.spacing == pytest.approx(2.0)


def test_frames_of_reads_no_pixels(realdata: Path):
    f = sorted((realdata / "dcm_qa_xa30/12_DWI_TRACEW").iterdir())[0]
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    frames = frames_of(ds, f)
    assert len(frames) == 39 and {fr.b_value for fr in frames} == {2500.0}
    assert all(fr.directionality == "ISOTROPIC" for fr in frames)


def test_series_split_over_folders_is_whole_again(realdata: Path, tmp_path: Path):
    """A series that arrived in two associations (two folders) is one series; copies stay apart."""
    import shutil

    src = sorted((realdata / "dcm_qa_xa30i/11001_DWI_b0_b2500").iterdir())
    for i, f in enumerate(src):
        d = tmp_path / ("assoc1" if i % 2 else "assoc2")
        d.mkdir(exist_ok=True)
        shutil.copy(f, d / f.name)
    (s,) = group_series([tmp_path])
    assert len(s.paths) == 10 and s.series_number == 11001
    # Copies of the same SOP instances in two folders (dicom2nifti generic_compressed_*) stay apart.
    copies = group_series(sorted((realdata / "dicom2nifti").glob("generic_compressed_*")))
    assert len(copies) == 4 and len({c.series_uid for c in copies}) == 1


def test_selection_pickles(realdata: Path):
    """The worker pickles the Selection between stages."""
    import pickle

    from worker.pipeline.classify import classify_folder, select_inputs

    sel = select_inputs(classify_folder([realdata / "dcm_qa_xa30i", realdata / "dicom2nifti/siemens_anatomical_001"]))
    again = pickle.loads(pickle.dumps(sel))
    assert again.b_high == sel.b_high and len(again.high_b_frames()) == len(sel.high_b_frames())


def test_mosaic_is_refused_with_a_reason(realdata: Path):
    (s,) = group_series([realdata / "dcm_qa_ts/ts1_explicit_le"])
    with pytest.raises(InvalidInputError, match="mosaic"):
        build_volume(s.frames, "EPI")
