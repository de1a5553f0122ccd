"""Every compressed real series decodes to the same pixels as its uncompressed twin.

dcm_qa_ts: one Siemens image in nine transfer syntaxes; the Explicit VR Little Endian copy is the twin.
dicom2nifti generic_compressed_*: four copies of one series (RLE, JPEG lossless, JPEG-LS, JPEG 2000)
with no uncompressed copy in the pack, so DCMTK (an independent decoder) writes the uncompressed twin
of the RLE, JPEG and JPEG-LS copies (dcmdrle, dcmdjpeg, dcmdjpls); the JPEG 2000 copy, which DCMTK
cannot decode, is compared with the twin of the RLE copy (same SOP instances).
Lossy: no lossy series is in the pack, so DCMTK's dcmcjpeg makes a lossy JPEG Extended (12-bit) copy of
the dcm_qa_ts image; it is compared with the original WITHIN A TOLERANCE (lossy by definition).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from common.dicomio import group_series
from common.dicomio.pixels import LOSSY_TRANSFER_SYNTAXES, read_pixels, transfer_syntax
from common.dicomio.volume import build_volume
from tests.conftest import require_tool

TS_FOLDERS = ["ts2_implicit_le", "ts3_explicit_be", "ts4_rle", "ts5_jpeg_lossless_dcmtk", "ts6_jpeg_lossless_gdcm",
              "ts7_jpegls_gdcm", "ts8_jpegls_dcmtk", "ts9_j2k_lossless"]


def _one(folder: Path) -> Path:
    (f,) = sorted(folder.iterdir())
    return f


@pytest.mark.parametrize("folder", TS_FOLDERS)
def test_dcm_qa_ts_matches_explicit_le(realdata: Path, folder: str):
    ref = read_pixels(_one(realdata / "dcm_qa_ts" / "ts1_explicit_le"))
    got = read_pixels(_one(realdata / "dcm_qa_ts" / folder))
    assert got.shape == ref.shape == (1, 384, 384)
    assert np.array_equal(got, ref)
    assert float(ref.max()) > 0  # not two empty images


def _dcmtk_twin(tool: str, src: Path, out: Path) -> Path:
    exe = require_tool(tool)
    subprocess.run([exe, str(src), str(out)], check=True, capture_output=True, timeout=60)
    assert transfer_syntax(out) == "1.2.840.10008.1.2.1"
    return out


@pytest.mark.parametrize(
    ("folder", "tool"),
    [("generic_compressed_rle_001", "dcmdrle"), ("generic_compressed_jpeg_001", "dcmdjpeg"),
     ("generic_compressed_jpegls_001", "dcmdjpls")],
)
def test_dicom2nifti_compressed_matches_dcmtk_twin(realdata: Path, tmp_path: Path, folder: str, tool: str):
    files = sorted((realdata / "dicom2nifti" / folder).iterdir())
    for i, f in enumerate(files):
        twin = _dcmtk_twin(tool, f, tmp_path / f"{i}.dcm")
        assert np.array_equal(read_pixels(f), read_pixels(twin)), f


def test_dicom2nifti_j2k_matches_rle_twin(realdata: Path, tmp_path: Path):
    j2k = sorted((realdata / "dicom2nifti" / "generic_compressed_j2k_001").iterdir())
    rle = sorted((realdata / "dicom2nifti" / "generic_compressed_rle_001").iterdir())
    for i, (a, b) in enumerate(zip(j2k, rle, strict=True)):
        da, db = pydicom.dcmread(a, stop_before_pixels=True), pydicom.dcmread(b, stop_before_pixels=True)
        assert da.SOPInstanceUID == db.SOPInstanceUID
        twin = _dcmtk_twin("dcmdrle", b, tmp_path / f"{i}.dcm")
        assert np.array_equal(read_pixels(a), read_pixels(twin))


def test_compressed_series_build_identical_volumes(realdata: Path):
    """Through the whole path (headers -> frames -> SimpleITK), not just the pixel decoder."""
    series = {s.folder.name: s for s in group_series(sorted((realdata / "dicom2nifti").glob("generic_compressed_*")))}
    assert len(series) == 4
    arrays = {}
    for name, s in series.items():
        vol = build_volume(s.frames, name)
        arrays[name] = vol.image
    ref = arrays.pop("generic_compressed_rle_001")
    import SimpleITK as sitk

    for name, img in arrays.items():
        assert np.array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref)), name
        assert img.GetOrigin() == ref.GetOrigin() and img.GetDirection() == ref.GetDirection()


def test_lossy_jpeg_extended_within_tolerance(realdata: Path, tmp_path: Path):
    exe = require_tool("dcmcjpeg")
    src = _one(realdata / "dcm_qa_ts" / "ts1_explicit_le")
    out = tmp_path / "lossy.dcm"
    # +ee: JPEG Extended (process 2+4, lossy, up to 12 bits); +q 90 quality.
    subprocess.run([exe, "+ee", "+q", "90", str(src), str(out)], check=True, capture_output=True, timeout=60)
    ts = transfer_syntax(out)
    assert ts in LOSSY_TRANSFER_SYNTAXES
    ref = read_pixels(src)
    got = read_pixels(out)
    assert got.shape == ref.shape
    err = np.abs(got - ref)
    rng = float(ref.max() - ref.min())
    # Lossy: not identical, but close - mean error under 1 % and 99th percentile under 5 % of the range.
    assert not np.array_equal(got, ref)
    assert err.mean() < 0.01 * rng
    assert np.percentile(err, 99) < 0.05 * rng


def test_colour_image_is_refused_with_a_reason(realdata: Path):
    from common.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="colour image"):
        read_pixels(_one(realdata / "dcm_qa_xa30i" / "15001_ColFA_SC"))
