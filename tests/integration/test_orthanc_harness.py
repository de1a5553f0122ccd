"""The Orthanc harness survives a port that another process takes between our pick and Orthanc's bind.

A CI run lost the dashboard browser test to exactly that: Orthanc exited at once with "port ... already
in use". The harness now picks new ports and starts again, keeping a DICOM port the caller fixed.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from tests.integration.harness import OrthancServer


def test_orthanc_starts_on_new_ports_when_its_http_port_is_taken(tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc", verbose=False)
    taken = orthanc.http_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            orthanc.start()
            assert orthanc.http_port != taken
            assert httpx.get(f"{orthanc.url}/system", timeout=5).json()["DicomPort"] == orthanc.dicom_port
            assert "already in use" in orthanc.log.read_text()
        finally:
            orthanc.stop()
