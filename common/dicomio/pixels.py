"""Pixel decoding for every transfer syntax we accept, in real-world units (rescale applied).

pydicom decodes uncompressed (implicit/explicit, little/big endian) and RLE natively; JPEG baseline,
extended and lossless (.50/.51/.57/.70), JPEG-LS and JPEG 2000 go through pylibjpeg (libjpeg and
openjpeg plugins) or pyjpegls. A missing decoder is reported with the transfer syntax and the package
to install, not as a bare traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from common.errors import InvalidInputError

#: Transfer syntaxes the pipeline is tested with (dcm_qa_ts, dicom2nifti and synthesised lossy JPEG).
SUPPORTED_TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (lossy, 8 bit)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (lossy, 12 bit)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}

LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
}


def read_pixels(path: str | Path) -> np.ndarray:
    """All frames of a file as float32 (frames, rows, cols) with the stored values (no rescale).

    Rescale is applied per frame by the caller (enhanced objects rescale per frame).
    """
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user-facing problem
        raise InvalidInputError(f"{path}: not a readable DICOM file ({exc})") from exc
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InvalidInputError(
            f"{path}: colour image ({ds.get('PhotometricInterpretation')}); only greyscale MR is used as input"
        )
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        name = SUPPORTED_TRANSFER_SYNTAXES.get(str(ts), ts.name)
        raise InvalidInputError(
            f"{path}: cannot decode pixel data in transfer syntax {name} ({ts}): {exc}. Install the decoder "
            "(pylibjpeg with pylibjpeg-libjpeg and pylibjpeg-openjpeg, or pyjpegls) or have the sender "
            "transcode to Explicit VR Little Endian."
        ) from exc
    arr = np.asarray(arr)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames == 1 and arr.ndim == 2:
        arr = arr[None]
    return arr.astype(np.float32, copy=False)


def transfer_syntax(path: str | Path) -> str:
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    return str(ds.file_meta.get("TransferSyntaxUID", ""))


class PixelCache:
    """Decode each file once while a volume is being built (many frames share one file)."""

    def __init__(self) -> None:
        self._data: dict[Path, np.ndarray] = {}

    def frame(self, path: Path, index: int | None, rescale: tuple[float, float]) -> np.ndarray:
        if path not in self._data:
            self._data[path] = read_pixels(path)
        arr = self._data[path]
        i = 0 if index is None else index
        if i >= arr.shape[0]:
            raise InvalidInputError(f"{path}: frame {i + 1} requested but the file holds {arr.shape[0]}")
        slope, intercept = rescale
        out = arr[i]
        if slope != 1.0 or intercept != 0.0:
            out = out * np.float32(slope) + np.float32(intercept)
        return out
