"""Fixtures shared by every test: real data location, free ports, external tools, Redis, settings.

External programs (DCMTK, Orthanc, dciodvfy, Chromium) are real. Under ``make test``
(SYNTHPERF_REQUIRE_TOOLS=1) a missing one fails the test; run bare, it is skipped with a reason.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("SYNTHPERF_REALDATA", REPO_ROOT.parent / "shared" / "realdata"))


def small_scale() -> bool:
    """True under `make test`: slow/load tests run in their small form."""
    return os.environ.get("SYNTHPERF_SLOW_SCALE", "small") == "small"


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.fail(f"real DICOM data not found at {REALDATA} (expected ../shared/realdata)")
    return REALDATA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


def require_tool(name: str) -> str:
    """Path of an external program; fail under make test when missing, else skip."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} is not installed (make test installs it from Debian packages)"
    if os.environ.get("SYNTHPERF_REQUIRE_TOOLS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("SYNTHPERF_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        msg = f"no Redis at {url}: {exc}"
        if os.environ.get("SYNTHPERF_REQUIRE_TOOLS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return url


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's SYNTHPERF_* settings, except the test-infrastructure ones."""
    keep = {"SYNTHPERF_TEST_REDIS_URL", "SYNTHPERF_REQUIRE_TOOLS", "SYNTHPERF_SLOW_SCALE", "SYNTHPERF_REALDATA",
            "SYNTHPERF_SCREENSHOTS"}
    for key in list(os.environ):
        if key.startswith("SYNTHPERF_") and key not in keep:
            monkeypatch.delenv(key, raising=False)
    from common.config import get_settings

    get_settings.cache_clear()
