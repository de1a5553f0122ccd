"""What the SCP negotiates: every storage SOP class pynetdicom knows, in the transfer syntaxes
a scanner or PACS is likely to propose, plus Verification.

The SCP accepts the first of the requestor's proposed transfer syntaxes that it supports, so a
sender that proposes a file's own (compressed) syntax gets it and the bytes are stored as sent.
"""

from __future__ import annotations

from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

UNCOMPRESSED = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
)
COMPRESSED = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL Lossless Only
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
STORAGE_TRANSFER_SYNTAXES = UNCOMPRESSED + COMPRESSED

STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
VERIFICATION = str(Verification)


def add_contexts(ae) -> None:  # type: ignore[no-untyped-def]
    """Register our supported presentation contexts on a pynetdicom AE."""
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, list(STORAGE_TRANSFER_SYNTAXES))
    ae.add_supported_context(VERIFICATION, list(UNCOMPRESSED[:3]))
