"""One origin for OHIF: its built app, our app-config, and ``/dicom-web`` proxied to a PACS.

OHIF (the npm package ``@ohif/app``, fetched by ``deploy/dev/ensure_ohif.sh``) is a static web
app that talks DICOMweb. Serving the app and the PACS's DICOMweb from one origin spares CORS (the
Orthanc DICOMweb plugin sends no CORS headers) and lets the app-config name the data source by a
relative root. Used by the viewer test (tests/integration/test_viewer_ohif.py) and by ``make run``
(cli/demo.py), where Orthanc is the demo PACS.

The server is the standard library's threading HTTP server: the app's bundles are files, and the
proxy forwards one request per connection to the PACS (OHIF fetches metadata and frames with a
handful of parallel requests). It binds to loopback unless told otherwise: the demo's PACS has no
authentication.
"""

from __future__ import annotations

import http.client
import json
import logging
import mimetypes
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("synthperf.viewer")

OHIF_VERSION = "3.13.2"
REPO_ROOT = Path(__file__).resolve().parents[1]
DICOMWEB_PREFIX = "/dicom-web"
# headers that describe one hop, never forwarded (RFC 9110 7.6.1)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-connection"}
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".css": "text/css",
         ".json": "application/json", ".svg": "image/svg+xml", ".woff2": "font/woff2", ".html": "text/html"}


def ohif_dist(root: Path | None = None) -> Path | None:
    """The OHIF app's ``dist`` folder if installed (``SYNTHPERF_OHIF_DIST`` or the ensure_ohif.sh cache)."""
    env = os.environ.get("SYNTHPERF_OHIF_DIST")
    candidates = [Path(env)] if env else []
    tools = Path(os.environ.get("SYNTHPERF_TOOLS_DIR", (root or REPO_ROOT) / ".tools"))
    candidates.append(tools / f"ohif-{OHIF_VERSION}" / "dist")
    for c in candidates:
        if (c / "index.html").is_file():
            return c
    return None


def app_config(dicomweb_root: str = DICOMWEB_PREFIX) -> str:
    """OHIF's ``window.config``: one DICOMweb data source at ``dicomweb_root`` on this origin.

    Settings for Orthanc's DICOMweb plugin: no includefield in QIDO, no fuzzy matching, frames by
    WADO-RS, thumbnails rendered by the viewer (the plugin's /rendered is optional), multipart
    boundaries without quotes. The investigational-use dialog and the CPU-rendering warning would
    cover the viewport in a headless browser; the test and the demo turn them off.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "synthperf",
        "configuration": {
            "friendlyName": "synthperf demo PACS (Orthanc)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "name": "synthperf",
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": "synthperf",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class _Handler(BaseHTTPRequestHandler):
    server: _FrontServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # noqa: D102 - quiet unless debugging
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        if path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/"):
            self._proxy()
        elif self.command == "POST":
            self._send(405, b"method not allowed\n", "text/plain")
        elif path == "/app-config.js":
            self._send(200, self.server.config_js, "text/javascript", cache=False)
        else:
            self._static(path)

    def _send(self, status: int, body: bytes, ctype: str, cache: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        # cross-origin isolation: cornerstone uses SharedArrayBuffer when the page is isolated
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self, path: str) -> None:
        root = self.server.dist
        rel = path.lstrip("/")
        target = (root / rel).resolve() if rel else root / "index.html"
        if not target.is_relative_to(root):
            self._send(404, b"not found\n", "text/plain")
            return
        if not target.is_file():
            if Path(rel).suffix:  # a missing asset, not an app route
                self._send(404, b"not found\n", "text/plain")
                return
            target = root / "index.html"  # /viewer, /segmentation, ...: the app routes itself
        ctype = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), ctype, cache=target.name != "index.html")

    def _request_body(self) -> bytes | None:
        """The request's body, whole: by Content-Length, or de-chunked (STOW-RS clients such as
        dicomweb-client stream their multipart body with chunked transfer encoding)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"x", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(8)  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _proxy(self) -> None:
        up = self.server.upstream
        try:
            body = self._request_body()
        except ValueError as exc:
            self._send(400, f"bad request body: {exc}\n".encode(), "text/plain", cache=False)
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() not in ("host", "accept-encoding")}
        # the PACS builds absolute BulkDataURIs from Host: keep them on this origin
        headers["Host"] = self.headers.get("Host", f"{self.server.server_address[0]}:{self.server.server_address[1]}")
        upstream_path = up.path.rstrip("/") + self.path[len(DICOMWEB_PREFIX):]
        conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=self.server.timeout_s)
        try:
            conn.request(self.command, upstream_path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            self._send(502, f"PACS unreachable: {exc}\n".encode(), "text/plain", cache=False)
            return
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _FrontServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], dist: Path, upstream: str, config_js: bytes, timeout_s: float) -> None:
        super().__init__(addr, _Handler)
        self.dist = dist.resolve()
        self.upstream = urlsplit(upstream)
        self.config_js = config_js
        self.timeout_s = timeout_s


class ViewerFront:
    """OHIF's app and a PACS's DICOMweb on one origin; ``start()`` runs it in a daemon thread.

    ``upstream`` is the PACS's DICOMweb base URL (for Orthanc ``http://host:8042/dicom-web``);
    requests under ``/dicom-web`` go there with their path and query, everything else is the app.
    """

    def __init__(self, dist: Path, upstream: str, host: str = "127.0.0.1", port: int = 0,
                 timeout_s: float = 60.0) -> None:
        dist = Path(dist)
        if not (dist / "index.html").is_file():
            raise ValueError(f"dist: no OHIF app (index.html) in {dist}; run deploy/dev/ensure_ohif.sh")
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream: an http:// DICOMweb base URL is needed, got {upstream!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port: {port} is not a TCP port")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be positive, got {timeout_s}")
        self.dist = dist
        self.upstream = upstream
        self._server = _FrontServer((host, port), dist, upstream, app_config().encode(), timeout_s)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def study_url(self, study_uid: str) -> str:
        """The viewer page of one study (OHIF's basic viewer mode)."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"

    def start(self) -> ViewerFront:
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-front", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
