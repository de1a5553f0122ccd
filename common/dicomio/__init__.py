"""Reading DICOM series into volumes: headers, frames, pixels (every supported transfer syntax),
slice geometry checks and SimpleITK images. UID helpers live in ``common.dicomio.uids``.
"""

from common.dicomio.frames import DEFAULT_B0_MAX, FrameInfo, frames_of, normalised_b
from common.dicomio.pixels import SUPPORTED_TRANSFER_SYNTAXES, PixelCache, read_pixels
from common.dicomio.series import SeriesFiles, group_series
from common.dicomio.volume import SliceRef, Volume, build_volume

__all__ = [
    "DEFAULT_B0_MAX",
    "FrameInfo",
    "PixelCache",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "SeriesFiles",
    "SliceRef",
    "Volume",
    "build_volume",
    "frames_of",
    "group_series",
    "normalised_b",
    "read_pixels",
]
