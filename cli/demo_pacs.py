"""The demo's PACS for ``make run``: Orthanc with OHIF in front of it, so a newcomer sees the results
where a radiologist would, in a viewer.

Where Orthanc (Debian ``orthanc``), its DICOMweb plugin (``orthanc-dicomweb``) and OHIF's built app
(``deploy/dev/ensure_ohif.sh``; ``make test`` installs all three) are present and no destination is
configured, ``synthperf serve --demo`` starts Orthanc on loopback with its data under
``<data_dir>/demo/orthanc`` (kept across runs), puts OHIF and Orthanc's DICOMweb on one origin
(cli/viewer.py, port 3000 or a free one), and makes Orthanc the one destination: the worker sends
the results there by C-STORE. Where something is missing, it says what and how to get it, and the
demo runs as before (results in the output folder, "done, not delivered").

Orthanc runs as our child, told to die with us (PR_SET_PDEATHSIG), and is stopped with ``serve``.
Nothing here is for production: the PACS has no authentication and listens on loopback only.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from cli.viewer import ViewerFront, ohif_dist
from common.ports import free_port

log = logging.getLogger("synthperf.demo")

VIEWER_PORT = 3000  # OHIF's usual port; a free one when it is taken
PACS_AE = "ORTHANC"
PLUGIN_GLOB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*"
HOW_TO_GET = ("make tools (Debian packages orthanc and orthanc-dicomweb, and OHIF's app through "
              "deploy/dev/ensure_ohif.sh; make test runs it)")

_current: DemoPacs | None = None


def current() -> DemoPacs | None:
    """The demo PACS this process started, if any (read by cli.demo to print the viewer URL)."""
    return _current


def _orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                            if Path(p).is_file()), None)


def missing() -> list[str]:
    """What the demo PACS needs and this machine lacks (empty: all there)."""
    lack = []
    if _orthanc_binary() is None:
        lack.append("Orthanc")
    if not glob.glob(PLUGIN_GLOB):
        lack.append("Orthanc's DICOMweb plugin")
    if ohif_dist() is None:
        lack.append("OHIF's app")
    return lack


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class DemoPacs:
    """Orthanc (C-STORE and DICOMweb on loopback) and OHIF on one origin in front of it."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", viewer_port: int = VIEWER_PORT,
                 timeout_s: float = 30.0) -> None:
        if not 0 <= viewer_port <= 65535:
            raise ValueError(f"viewer_port: {viewer_port} is not a TCP port")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be positive, got {timeout_s}")
        lack = missing()
        if lack:
            raise FileNotFoundError(f"demo PACS needs {', '.join(lack)}; get them with {HOW_TO_GET}")
        self.folder = Path(folder)
        self.host = host
        self.viewer_port = viewer_port
        self.timeout_s = timeout_s
        self.dicom_port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.front: ViewerFront | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/dicom-web"

    @property
    def destination(self) -> dict[str, Any]:
        """Our destination setting for this PACS (C-STORE)."""
        return {"ae_title": PACS_AE, "host": self.host, "port": self.dicom_port}

    def viewer_url(self, study_uid: str) -> str:
        if self.front is None:
            raise RuntimeError("demo PACS not started")
        return self.front.study_url(study_uid)

    def start(self) -> DemoPacs:
        from common.procs import die_with_parent

        self.folder.mkdir(parents=True, exist_ok=True)
        self.dicom_port = free_port(self.host)
        self.http_port = free_port(self.host)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "synthperf-demo", "DicomAet": PACS_AE, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "HttpBindAddress": self.host, "DicomBindAddress": self.host,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "StorageDirectory": str((self.folder / "db").resolve()), "IndexDirectory": str((self.folder / "db").resolve()),
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "Plugins": sorted(glob.glob(PLUGIN_GLOB))[:1], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }, indent=2))
        logfile = (self.folder / "orthanc.log").open("ab")
        parent = os.getpid()
        self.proc = subprocess.Popen([_orthanc_binary(), str(config)], stdout=logfile, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TCP_NODELAY": "1"}, start_new_session=True,
                                     preexec_fn=lambda: die_with_parent(expected_ppid=parent))
        logfile.close()
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.folder / 'orthanc.log'}")
            try:
                if httpx.get(f"http://{self.host}:{self.http_port}/system", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer within {self.timeout_s:.0f} s; see {self.folder}")
            time.sleep(0.2)
        port = self.viewer_port if self.viewer_port and not _port_taken(self.host, self.viewer_port) else 0
        dist = ohif_dist()
        assert dist is not None  # checked in __init__
        self.front = ViewerFront(dist, self.dicomweb_url, host=self.host, port=port).start()
        return self

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _say(text: str) -> None:
    print(f"synthperf demo: {text}", flush=True)


def start_demo_pacs(settings: Any, child_env: dict[str, str]) -> tuple[DemoPacs | None, Any]:
    """For ``serve --demo``: start the demo PACS when nothing is configured and all it needs is
    here, make it the destination (in ``settings`` and the worker's ``child_env``); else say why
    not. Returns (the PACS or None, the settings to run with)."""
    global _current
    if settings.destinations:
        return None, settings
    lack = missing()
    if lack:
        _say(f"no demo PACS: {', '.join(lack)} not installed; to see the results in Orthanc and the OHIF "
             f"viewer, run {HOW_TO_GET}, then make run again")
        return None, settings
    pacs = DemoPacs(Path(settings.data_dir) / "demo" / "orthanc")
    try:
        pacs.start()
    except (OSError, RuntimeError) as exc:
        _say(f"demo PACS did not start ({exc}); the demo goes on without it")
        return None, settings
    from common.config import Destination

    settings = settings.model_copy(update={"destinations": [Destination(**pacs.destination)]})
    child_env["SYNTHPERF_DESTINATIONS"] = json.dumps([pacs.destination])
    _current = pacs
    _say(f"demo PACS: Orthanc {PACS_AE} on {pacs.host}:{pacs.dicom_port} (data in {pacs.folder}), "
         f"OHIF viewer at {pacs.front.url if pacs.front else '?'}/")
    return pacs, settings


def stop_demo_pacs() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None
