"""Check the structure of a received data set and read its few header attributes, without
decoding anything else.

The SCP stores the bytes exactly as received, so it must not let pydicom decode (or silently
accept) them. This walker reads each element's tag and length, descends into undefined-length
sequences and encapsulated pixel data, and fails when a value runs past the end, a delimiter is
missing, tags are out of order or an explicit VR is not two letters: that is how a non-DICOM
payload or a truncated data set is told apart from a good one. It costs one pass over the
element headers; values, pixel data included, are skipped by length.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_MAX_DEPTH = 32

# Top-level attributes the gateway reads: tag -> Header field.
WANTED = {
    0x00080005: "specific_character_set",
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080020: "study_date",
    0x00080050: "accession_number",
    0x00080060: "modality",
    0x00081030: "study_description",
    0x0008103E: "series_description",
    0x00100010: "patient_name",
    0x00100020: "patient_id",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
    0x00200011: "series_number",
    0x00200013: "instance_number",
    0x00200105: "number_of_temporal_positions",
    0x00201002: "images_in_acquisition",
    0x00280008: "number_of_frames",
}
_INT_FIELDS = {
    "series_number",
    "instance_number",
    "number_of_temporal_positions",
    "images_in_acquisition",
    "number_of_frames",
}


IS_MIN, IS_MAX = -(2**31), 2**31 - 1  # the range of an Integer String (IS) value


class MalformedDatasetError(ValueError):
    """The bytes are not a complete DICOM data set in the negotiated transfer syntax."""


@dataclass
class Header:
    """The attributes the gateway needs; strings are stripped, integers parsed (None if absent)."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    specific_character_set: str | None = None
    study_date: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    number_of_temporal_positions: int | None = None
    images_in_acquisition: int | None = None
    number_of_frames: int | None = None


def _walk(
    buf: bytes, pos: int, end: int, explicit: bool, little: bool, depth: int, found: dict[int, bytes] | None
) -> tuple[int, int]:
    """Walk elements from ``pos``; return (position, terminating delimiter tag or 0 at ``end``)."""
    if depth > _MAX_DEPTH:
        raise MalformedDatasetError("sequences nested too deeply")
    hh = struct.Struct("<HH" if little else ">HH")
    u16 = struct.Struct("<H" if little else ">H")
    u32 = struct.Struct("<I" if little else ">I")
    last_tag = -1
    while pos < end:
        if pos + 8 > end:
            raise MalformedDatasetError(f"truncated element header at byte {pos}")
        group, elem = hh.unpack_from(buf, pos)
        tag = (group << 16) | elem
        if tag in (_ITEM_DELIM, _SEQ_DELIM):
            return pos + 8, tag
        if tag <= last_tag:
            raise MalformedDatasetError(f"element ({group:04X},{elem:04X}) out of order at byte {pos}")
        last_tag = tag
        vr = b""
        if explicit and group != 0xFFFE:
            vr = buf[pos + 4 : pos + 6]
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise MalformedDatasetError(f"invalid VR at byte {pos}: not a DICOM data set?")
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise MalformedDatasetError(f"truncated element header at byte {pos}")
                length = u32.unpack_from(buf, pos + 8)[0]
                start = pos + 12
            else:
                length = u16.unpack_from(buf, pos + 6)[0]
                start = pos + 8
        else:
            length = u32.unpack_from(buf, pos + 4)[0]
            start = pos + 8
        if length == _UNDEFINED:
            # Sequence, encapsulated pixel data, or UN holding an implicit-VR LE sequence.
            inner_explicit, inner_little = (False, True) if vr == b"UN" else (explicit, little)
            pos = _walk_items(buf, start, end, inner_explicit, inner_little, depth + 1)
            continue
        if start + length > end:
            raise MalformedDatasetError(
                f"value of ({group:04X},{elem:04X}) runs past the end of the data set (truncated?)"
            )
        if found is not None and tag in WANTED:
            found[tag] = buf[start : start + length]
        pos = start + length
    return pos, 0


def _walk_items(buf: bytes, pos: int, end: int, explicit: bool, little: bool, depth: int) -> int:
    """Items of an undefined-length sequence (or fragments) up to the sequence delimiter."""
    hh = struct.Struct("<HH" if little else ">HH")
    u32 = struct.Struct("<I" if little else ">I")
    while True:
        if pos + 8 > end:
            raise MalformedDatasetError("sequence not terminated: data set truncated")
        group, elem = hh.unpack_from(buf, pos)
        tag = (group << 16) | elem
        length = u32.unpack_from(buf, pos + 4)[0]
        if tag == _SEQ_DELIM:
            return pos + 8
        if tag != _ITEM:
            raise MalformedDatasetError(f"expected an item at byte {pos}, found ({group:04X},{elem:04X})")
        pos += 8
        if length == _UNDEFINED:
            pos, delim = _walk(buf, pos, end, explicit, little, depth, None)
            if delim != _ITEM_DELIM:
                raise MalformedDatasetError("item not terminated: data set truncated")
        else:
            if pos + length > end:
                raise MalformedDatasetError("item runs past the end of the data set (truncated?)")
            pos += length


def _decode(field: str, raw: bytes, charset: str) -> str | int | None:
    text = raw.rstrip(b"\x00 ").lstrip(b" ")
    if field in _INT_FIELDS:
        try:
            value = int(text.split(b"\\")[0].decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            return None
        # IS holds -2**31 .. 2**31 - 1 (PS3.5 6.2); a larger number is not a value we can trust
        # (and would not fit the job store's INTEGER columns on PostgreSQL).
        return value if IS_MIN <= value <= IS_MAX else None
    return text.decode(charset, errors="replace") or None


def parse_dataset(data: bytes, transfer_syntax: str) -> Header:
    """Validate the structure of ``data`` (a data set without file meta) and return its header.

    Raises MalformedDatasetError when the bytes are not one complete data set.
    """
    if transfer_syntax == DEFLATED_LE:
        try:
            data = zlib.decompress(data, -15)
        except zlib.error as exc:
            raise MalformedDatasetError(f"deflated data set does not inflate: {exc}") from exc
    explicit = transfer_syntax != IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    if len(data) < 8:
        raise MalformedDatasetError("data set is empty or shorter than one element")
    found: dict[int, bytes] = {}
    pos, delim = _walk(data, 0, len(data), explicit, little, 0, found)
    if delim:
        raise MalformedDatasetError(f"stray delimiter at top level near byte {pos}")
    charset_raw = found.get(0x00080005, b"")
    charset = "utf-8" if b"192" in charset_raw else "latin-1"
    header = Header()
    for tag, raw in found.items():
        field = WANTED[tag]
        setattr(header, field, _decode(field, raw, charset))
    return header


def split_part10(data: bytes) -> tuple[str, int, bytes]:
    """For a DICOM Part 10 file: (transfer syntax UID, offset of the data set, meta bytes).

    Raises MalformedDatasetError when there is no valid preamble and file meta group.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise MalformedDatasetError("no DICM prefix: not a DICOM Part 10 file")
    pos = 132
    ts = None
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", data, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            start = pos + 8
        if start + length > len(data):
            raise MalformedDatasetError("file meta information truncated")
        if elem == 0x0010:
            ts = data[start : start + length].rstrip(b"\x00 ").decode("ascii", errors="replace")
        pos = start + length
    if not ts:
        raise MalformedDatasetError("file meta information has no Transfer Syntax UID")
    return ts, pos, data[:pos]
