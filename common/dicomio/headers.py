"""Header access that survives vendors: private tags read as raw bytes, multi-frame functional groups.

Why this exists: the same fact (a b-value, an echo time, an orientation) lives in a different place
per vendor and per IOD. Classic images carry it at top level; enhanced multi-frame images carry it in
the shared or per-frame functional groups; vendors add private copies that pydicom may hand back
as undecoded bytes (VR UN in implicit-VR files). These helpers read each fact from wherever it is,
and return plain Python values.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

# Vendor private b-value tags (element numbers as reserved by each vendor's usual private creator).
SIEMENS_B_VALUE = Tag(0x0019, 0x100C)  # "SIEMENS MR HEADER" B_value, IS
SIEMENS_DIRECTIONALITY = Tag(0x0019, 0x100D)  # DiffusionDirectionality, CS
SIEMENS_GRADIENT = Tag(0x0019, 0x100E)  # DiffusionGradientDirection, FD x3
GE_SLOP_INT_6_9 = Tag(0x0043, 0x1039)  # "GEMS_PARM_01" slop_int_6..9; [0] is the b-value
GE_GRADIENT = (Tag(0x0019, 0x10BB), Tag(0x0019, 0x10BC), Tag(0x0019, 0x10BD))
PHILIPS_B_VALUE = Tag(0x2001, 0x1003)  # "Philips Imaging DD 001" Diffusion B-Factor, FL
PHILIPS_DIRECTIONALITY = Tag(0x2001, 0x1004)  # Diffusion Direction, CS (I = isotropic/trace)


def _raw(ds: Dataset, tag: BaseTag) -> Any:
    if tag not in ds:
        return None
    elem = ds[tag]
    return elem.value


def _to_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace").strip("\x00 ").strip()
    return str(value).strip()


def _numbers(value: Any, fmt: str | None = None) -> list[float]:
    """Parse a DS/IS/FL/FD value, single or multi, possibly still raw bytes."""
    if value is None:
        return []
    if isinstance(value, bytes):
        if fmt is not None and len(value) % struct.calcsize(fmt) == 0 and len(value) > 0:
            n = len(value) // struct.calcsize(fmt)
            return [float(v) for v in struct.unpack("<" + fmt * n, value)]
        text = _to_text(value) or ""
        out = []
        for part in text.split("\\"):
            try:
                out.append(float(part))
            except ValueError:
                return []
        return out
    if isinstance(value, str | int | float):
        try:
            return [float(value)]
        except ValueError:
            return []
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return []


def first_number(value: Any, fmt: str | None = None) -> float | None:
    nums = _numbers(value, fmt)
    return nums[0] if nums else None


def seq_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    """First item of a sequence, or None."""
    if ds is None or keyword not in ds:
        return None
    seq = ds[keyword].value
    return seq[0] if seq else None


def group_value(frame_groups: Iterable[Dataset | None], sequence: str, keyword: str) -> Any:
    """A value from the first functional group (per-frame first, then shared) that holds it."""
    for grp in frame_groups:
        item = seq_item(grp, sequence)
        if item is not None and keyword in item:
            value = item[keyword].value
            if value is not None and value != "":
                return value
    return None


def tokens(value: Any) -> tuple[str, ...]:
    """Upper-case tokens of a multi-valued CS such as ImageType ('ORIGINAL\\PRIMARY\\M')."""
    if value is None:
        return ()
    if isinstance(value, bytes):
        value = _to_text(value) or ""
    if isinstance(value, str):
        parts = value.split("\\")
    else:
        parts = [str(v) for v in value]
    return tuple(p.strip().upper() for p in parts if p and p.strip())


def siemens_b_value(ds: Dataset) -> float | None:
    return first_number(_raw(ds, SIEMENS_B_VALUE))


def ge_b_value(ds: Dataset) -> float | None:
    """GE stores b in slop_int_6 and sometimes adds 1e9 (and multiples) as a flag; strip it."""
    value = first_number(_raw(ds, GE_SLOP_INT_6_9))
    if value is None:
        return None
    while value >= 1e9:
        value -= 1e9
    return value if 0 <= value < 1e5 else None


def philips_b_value(ds: Dataset) -> float | None:
    return first_number(_raw(ds, PHILIPS_B_VALUE), "f")


def private_text(ds: Dataset, tag: BaseTag) -> str | None:
    return _to_text(_raw(ds, tag))


def private_vector(ds: Dataset, tag: BaseTag, fmt: str = "d") -> list[float]:
    return _numbers(_raw(ds, tag), fmt)
