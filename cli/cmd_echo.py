"""``synthperf echo HOST PORT``: C-ECHO a DICOM node (is it up, does it accept our AE title?)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("echo", help="C-ECHO a DICOM node", description=__doc__)
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aec", default="ANY-SCP", help="called AE title (default ANY-SCP)")
    p.add_argument("--aet", default="SYNTHPERF", help="our calling AE title")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=run)


def echo(host: str, port: int, called_aet: str = "ANY-SCP", calling_aet: str = "SYNTHPERF",
         timeout: float = 10.0) -> tuple[bool, str]:
    """(ok, message) of one C-ECHO."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted or unreachable"
        return False, f"association to {called_aet}@{host}:{port} {why}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and status.Status == 0:
        return True, f"C-ECHO {called_aet}@{host}:{port}: Success"
    code = f"0x{status.Status:04X}" if status else "no response"
    return False, f"C-ECHO {called_aet}@{host}:{port}: {code}"


def run(args: argparse.Namespace) -> int:
    ok, msg = echo(args.host, args.port, args.aec, args.aet, args.timeout)
    print(msg, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
