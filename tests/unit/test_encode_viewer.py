"""Encode choices made for viewers (issue 18): frame order of multi-frame objects and the integer
Tmax map's scale, read back from the files with pydicom and highdicom.

The same physical volume is encoded twice: on a grid whose z axis points along the slice normal
(ascending, as the loader builds it) and on the same grid described head-first (z axis against
the normal, the slices reversed). Both must give Parametric Map frames ascending along the
normal, and the same pixels frame for frame in every multi-frame object.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.unit.test_encode import SHAPE, dciodvfy_errors, make_input
from worker.pipeline.encode import (
    SEGMENT_RGB,
    TMAX_INT_MAX,
    TMAX_INT_SLOPE,
    Geometry,
    encode_outputs,
    tmax_int_stored,
)


def _descending(inp):
    """The same volume on a grid whose z axis runs against the slice normal."""
    geo = inp.geometry
    top = np.asarray(geo.origin) + (geo.shape_zyx[0] - 1) * geo.spacing[2] * geo.axes[2]
    d = np.asarray(geo.direction, float).reshape(3, 3).copy()
    d[:, 2] *= -1
    flipped = Geometry(origin=tuple(map(float, top)), spacing=geo.spacing, direction=tuple(d.flatten()),
                       shape_zyx=geo.shape_zyx)
    arrays = {k: getattr(inp, k)[::-1].copy() for k in ("dwi", "tmax", "tmax_sd", "core", "brain")}
    return dataclasses.replace(inp, geometry=flipped, tmax6=None, tmax10=None, **arrays)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    inp, _ = make_input(False)
    # a few voxels beyond the integer map's range, to see them saturate
    inp.tmax[4, 22, 15] = 41.0
    inp.tmax[4, 22, 16] = TMAX_INT_MAX * TMAX_INT_SLOPE + 0.04
    inp = dataclasses.replace(inp, tmax6=None, tmax10=None)
    down = _descending(inp)
    root = tmp_path_factory.mktemp("enc_viewer")
    out = {}
    for name, i in (("up", inp), ("down", down)):
        res = encode_outputs(i, root / name)
        out[name] = (i, {o.kind: Path(o.path) for o in res.objects if o.kind != "overlay"})
    return out


def _frame_positions(ds) -> tuple[np.ndarray, np.ndarray]:
    """(per-frame ImagePositionPatient, slice normal from the shared ImageOrientationPatient)."""
    iop = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    ipp = np.asarray([f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence],
                     float)
    return ipp, np.cross(iop[:3], iop[3:])


def _slice_of(inp, ipp: np.ndarray) -> int:
    """Our slice index at a frame position (exactly one must match)."""
    geo = inp.geometry
    hits = [k for k in range(geo.shape_zyx[0]) if np.allclose(geo.slice_position(k), ipp, atol=1e-3)]
    assert len(hits) == 1, f"frame at {ipp} matches slices {hits}"
    return hits[0]


@pytest.mark.parametrize("grid", ["up", "down"])
@pytest.mark.parametrize("kind", ["tmax", "tmax_int", "seg"])
def test_frames_hold_the_slice_at_their_position_and_maps_ascend_along_the_normal(pair, grid, kind):
    inp, paths = pair[grid]
    ds = pydicom.dcmread(paths[kind])
    ipp, normal = _frame_positions(ds)
    along = ipp @ normal
    if kind != "seg":  # viewers place SEG frames by position; OHIF stacks PM frames in file order
        assert np.all(np.diff(along) > 0), f"{kind} frames not ascending along the normal: {along}"
        index = [int(f.FrameContentSequence[0].DimensionIndexValues) for f in ds.PerFrameFunctionalGroupsSequence]
        assert index == list(range(1, len(index) + 1))
    px = ds.pixel_array
    if kind == "seg":  # frames are segment-major: segment 1 (core) first, one frame per slice
        n = SHAPE[0]
        assert [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                for f in ds.PerFrameFunctionalGroupsSequence[:n]] == [1] * n
        for i in range(n):
            np.testing.assert_array_equal(px[i].astype(bool), inp.core[_slice_of(inp, ipp[i])])
        return
    expected = inp.tmax if kind == "tmax" else tmax_int_stored(inp.tmax)
    for i in range(px.shape[0]):
        np.testing.assert_array_equal(px[i], expected[_slice_of(inp, ipp[i])])


@pytest.mark.parametrize("kind", ["tmax", "tmax_int", "tmax_sd", "seg"])
def test_the_grid_direction_does_not_change_the_stored_frames(pair, kind):
    up = pydicom.dcmread(pair["up"][1][kind])
    down = pydicom.dcmread(pair["down"][1][kind])
    np.testing.assert_array_equal(up.pixel_array, down.pixel_array)
    assert _frame_positions(up)[0].tolist() == _frame_positions(down)[0].tolist()


def test_integer_map_stores_tenths_of_a_second_below_ohif_overflow(pair):
    inp, paths = pair["up"]
    ds = pydicom.dcmread(paths["tmax_int"])
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
    assert "0.1 s units" in ds.SeriesDescription  # what a viewer ignoring the RWVM shows
    ipp, _ = _frame_positions(ds)
    stored = np.empty_like(ds.pixel_array)
    for i, p in enumerate(ipp):
        stored[_slice_of(inp, p)] = ds.pixel_array[i]
    assert int(stored.max()) == TMAX_INT_MAX  # the two voxels above 32.7 s saturate
    assert TMAX_INT_MAX * 100 <= 32767  # OHIF multiplies stored values by 100 into int16
    tmax = np.clip(inp.tmax, 0, None)
    inside = tmax < TMAX_INT_MAX * TMAX_INT_SLOPE
    np.testing.assert_array_equal(stored[inside], np.round(tmax[inside] * 10).astype(np.uint16))
    assert np.all(np.abs(stored[inside] * TMAX_INT_SLOPE - tmax[inside]) <= TMAX_INT_SLOPE / 2 + 1e-6)
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(rwvm.RealWorldValueSlope) == pytest.approx(0.1) and float(rwvm.RealWorldValueIntercept) == 0
    assert int(rwvm.RealWorldValueLastValueMapped) == TMAX_INT_MAX
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "s"
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (80.0, 160.0)  # 0..16 s in stored units
    # highdicom applies the RWVM: seconds again, within half a step
    vol = hd.imread(str(paths["tmax_int"])).get_volume()
    assert vol.array.max() == pytest.approx(TMAX_INT_MAX * TMAX_INT_SLOPE)


@pytest.mark.parametrize("kind", ["tmax", "tmax_int", "seg"])
def test_descending_grid_objects_pass_dciodvfy(pair, kind):
    errors = dciodvfy_errors(pair["down"][1][kind])
    assert not errors, f"{kind}: {errors}"


def test_seg_carries_display_colours_that_stay_coloured_where_segments_overlap(pair):
    """Each segment has RecommendedDisplayCIELabValue (OHIF warns over the image without it), and
    any two of the colours averaged (a viewer blending overlapping fills) stay far from grey."""
    inp, paths = pair["up"]
    seg = pydicom.dcmread(paths["seg"], stop_before_pixels=True)
    rgb = [np.asarray(hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb(clip=True), float)
           for s in seg.SegmentSequence]
    expected = [SEGMENT_RGB[key] for key in ("core", "tmax6", "tmax10")]
    np.testing.assert_allclose(rgb, expected, atol=2)
    for i in range(len(rgb)):
        for j in range(i + 1, len(rgb)):
            mix = (rgb[i] + rgb[j]) / 2
            assert mix.max() - mix.min() > 60, (i + 1, j + 1, mix)
    # the SEG cites the DWI alone: OHIF places a SEG on whichever referenced series it met first (OHIF-2)
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [inp.dwi_sources[0].SeriesInstanceUID]
