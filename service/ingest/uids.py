"""UID validation: a UID becomes a path component in the spool, so it is checked first.

DICOM PS3.5 9.1: components of digits separated by dots, at most 64 characters. We accept
leading zeros (some real scanners emit them) but never anything that could change the meaning
of a path: no separators, no "..", no empty components, no NUL.
"""

from __future__ import annotations

import re

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUIDError(ValueError):
    """A UID is missing or not a DICOM UID; the message names the attribute."""


def is_valid_uid(value: str | None) -> bool:
    return bool(value) and len(value) <= 64 and _UID.match(value) is not None  # type: ignore[arg-type]


def check_uid(name: str, value: str | None) -> str:
    """Return ``value`` if it is a usable UID, else raise InvalidUIDError naming ``name``."""
    if not value:
        raise InvalidUIDError(f"{name} is missing")
    if not is_valid_uid(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidUIDError(f"{name} {shown!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return value
