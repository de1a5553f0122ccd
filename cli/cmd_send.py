"""``synthperf send PATH... HOST PORT``: C-STORE DICOM files and folders (searched recursively).

Each file is proposed in its own transfer syntax and sent as stored (no decoding, no
transcoding), so what arrives is byte-for-byte what was on disk. Files that are not DICOM are
skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("send", help="C-STORE files or folders to a DICOM node", description=__doc__)
    p.add_argument("paths", nargs="+", help="files or folders, then HOST PORT")
    p.add_argument("--aec", default="SYNTHPERF", help="called AE title (default SYNTHPERF)")
    p.add_argument("--aet", default="SYNTHPERF-SCU", help="our calling AE title")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=run)


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return out


def send_paths(paths: list[Path], host: str, port: int, called_aet: str = "SYNTHPERF",
               calling_aet: str = "SYNTHPERF-SCU", timeout: float = 30.0) -> dict[str, int]:
    """Send every DICOM file under ``paths``; return counts {sent, failed, skipped}."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from pynetdicom import _config

    plan: dict[tuple[str, str], list[Path]] = defaultdict(list)
    skipped = 0
    for f in _files(paths):
        try:
            meta = dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            plan[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))].append(f)
        except (InvalidDicomError, AttributeError, OSError):
            print(f"skipped (not a DICOM file): {f}", file=sys.stderr)
            skipped += 1
    counts = {"sent": 0, "failed": 0, "skipped": skipped}
    # Send each file's data set bytes as stored (no decode/re-encode); the context proposed for
    # each file is its own SOP class and transfer syntax, which this mode requires.
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        _send_plan(plan, list(plan), host, port, called_aet, calling_aet, timeout, counts)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return counts


def _send_plan(plan: dict[tuple[str, str], list[Path]], keys: list[tuple[str, str]], host: str, port: int,
               called_aet: str, calling_aet: str, timeout: float, counts: dict[str, int]) -> None:
    from pynetdicom import AE

    # At most 128 presentation contexts per association.
    for start in range(0, len(keys), 120):
        chunk = keys[start:start + 120]
        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop_class, ts in chunk:
            ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            n = sum(len(plan[k]) for k in chunk)
            print(f"association to {called_aet}@{host}:{port} failed; {n} files not sent", file=sys.stderr)
            counts["failed"] += n
            continue
        try:
            for key in chunk:
                for f in plan[key]:
                    status = assoc.send_c_store(f)  # a path: sent without decoding
                    code = getattr(status, "Status", None)
                    if code is not None and (code == 0 or 0xB000 <= code <= 0xBFFF):
                        counts["sent"] += 1
                    else:
                        shown = f"0x{code:04X}" if code is not None else "no response"
                        print(f"failed ({shown}): {f}", file=sys.stderr)
                        counts["failed"] += 1
        finally:
            assoc.release()


def run(args: argparse.Namespace) -> int:
    if len(args.paths) < 3:
        print("usage: synthperf send PATH... HOST PORT", file=sys.stderr)
        return 2
    *paths, host, port_s = args.paths
    try:
        port = int(port_s)
    except ValueError:
        print(f"PORT must be a number, got {port_s!r}", file=sys.stderr)
        return 2
    try:
        counts = send_paths([Path(p) for p in paths], host, port, args.aec, args.aet, args.timeout)
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"sent {counts['sent']}, failed {counts['failed']}, skipped {counts['skipped']}")
    return 0 if counts["failed"] == 0 else 1
