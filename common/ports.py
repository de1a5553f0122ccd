"""Free TCP ports for the servers this project starts on loopback (the demo PACS, the test harnesses).

Why a module of its own: asking the kernel for port 0 and closing the probe socket gives a port that is
free *now*, and the next probe may get the very same number back. A CI run of ``make test`` started
Orthanc with its DICOM and HTTP ports equal; its HTTP server could not bind, and its readiness probe
spoke HTTP to its own DICOM listener. Every port handed out here is remembered for the life of the
process, so two servers started by one process never share one.
"""

from __future__ import annotations

import socket
import threading

_handed_out: set[tuple[str, int]] = set()
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port nothing on ``host`` listens on now and that this process has not handed out before.

    Another process can still take it before our server binds it (the kernel cannot reserve a port
    for later); callers that start a server retry with a new port when it reports the port in use.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    with _lock:
        for _ in range(attempts):
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
            if (host, port) not in _handed_out:
                _handed_out.add((host, port))
                return port
    raise RuntimeError(f"no port on {host} that this process has not used already, after {attempts} tries")
