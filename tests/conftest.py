"""Fixtures shared by every test: real data location, free ports, external tools, Redis, PostgreSQL,
job-store URLs, settings.

External programs (DCMTK, Orthanc, dciodvfy, Chromium, Redis, PostgreSQL) are real. Under ``make test``
(SYNTHPERF_REQUIRE_TOOLS=1) a missing one fails the test; run bare, it is skipped with a reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from common.ports import free_port  # the tests and bench/receive.py import it from here

REPO_ROOT = Path(__file__).resolve().parents[1]
#: One inference-path measurement per machine for the whole test session and later ones (the cache is
#: keyed by CPU, versions and model, so a stale entry is never used); only the first pipeline pays it.
SHARED_RUNTIME_DIR = Path(tempfile.gettempdir()) / f"synthperf-test-runtime-{os.getuid()}"
REALDATA = Path(os.environ.get("SYNTHPERF_REALDATA", REPO_ROOT.parent / "shared" / "realdata"))


def small_scale() -> bool:
    """True under `make test`: slow/load tests run in their small form."""
    return os.environ.get("SYNTHPERF_SLOW_SCALE", "small") == "small"


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.fail(f"real DICOM data not found at {REALDATA} (expected ../shared/realdata)")
    return REALDATA


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for the test: on a shared 2-core box, 2 spinning OpenMP threads can be
    20x slower. The model tests ask for it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def port() -> int:
    return free_port()


def _missing(msg: str) -> NoReturn:
    """Fail under make test (SYNTHPERF_REQUIRE_TOOLS=1), skip otherwise."""
    if os.environ.get("SYNTHPERF_REQUIRE_TOOLS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def require_tool(name: str) -> str:
    """Path of an external program; fail under make test when missing, else skip."""
    path = shutil.which(name)
    if path:
        return path
    _missing(f"{name} is not installed (make test installs it from Debian packages)")


def _per_worker_db(url: str) -> str:
    """``url`` with a Redis database number of this pytest-xdist worker's own.

    make test runs the suite in parallel processes (pytest-xdist); tests that flush the database or
    count a fixed queue's depth must not see another process's keys. Worker gwN takes the database
    N below the configured one (modulo 16); a run without xdist keeps the configured database.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    db = parts.path.strip("/")
    number = int(db) if db.isdigit() else 0
    return parts._replace(path=f"/{(number - int(worker[2:])) % 16}").geturl()


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = _per_worker_db(os.environ.get("SYNTHPERF_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        _missing(f"no Redis at {url}: {exc}")
    return url


POSTGRES_DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
POSTGRES_TEST_TIMEZONE = "America/St_Johns"  # UTC-3:30/-2:30: a wrong zone assumption shows at once


def _postgres_admin_engine(url: str):  # type: ignore[no-untyped-def]
    """An autocommit engine without a pool (CREATE/DROP DATABASE cannot run in a transaction)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})


def _postgres_answers(url: str) -> str | None:
    """None when a PostgreSQL server accepts a connection at ``url``, else why not."""
    from sqlalchemy import text

    engine = _postgres_admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as exc:  # noqa: BLE001
        cause = getattr(exc, "orig", None) or exc  # the driver's own words, without SQLAlchemy's wrapping
        return " ".join(str(cause).split()) or type(cause).__name__
    finally:
        engine.dispose()


def _shown(url: str) -> str:
    """``url`` for a message: any password masked."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin directory holding initdb and pg_ctl, if any."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").exists()]

    def version(d: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in d.parent.name.split(".") if x.isdigit())

    return max(found, key=version) if found else None


class _PrivatePostgres:
    """A throw-away PostgreSQL cluster in a temp dir on a free loopback port (trust auth, no fsync).

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="synthperf-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError("running as root and there is no 'postgres' user to run initdb as") from None
            runuser = shutil.which("runuser")
            if runuser is None:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError("running as root and runuser is missing (needed to run initdb as postgres)")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.prefix = [runuser, "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip()} {tail}")

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts,
                  "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A PostgreSQL server to create test databases on (URL of its maintenance database).

    SYNTHPERF_TEST_POSTGRES_URL, or the server on 127.0.0.1:5432 (user postgres, trust auth);
    when that default answers not, a private cluster from Debian's binaries for the session.
    """
    explicit = os.environ.get("SYNTHPERF_TEST_POSTGRES_URL")
    url = explicit or POSTGRES_DEFAULT_URL
    shown = _shown(url)
    why = _postgres_answers(url)
    if why is None:
        yield url
        return
    if explicit:  # a URL someone chose is not silently replaced by another server
        _missing(f"no PostgreSQL at SYNTHPERF_TEST_POSTGRES_URL={shown}: {why}")
    bindir = _postgres_bindir()
    if bindir is None:
        _missing(f"no PostgreSQL at {shown} ({why}) and no /usr/lib/postgresql/*/bin/initdb to start one "
                 "(make test installs the Debian package postgresql)")
    try:
        cluster = _PrivatePostgres(bindir)  # type: ignore[arg-type]
    except (RuntimeError, OSError) as exc:
        _missing(f"no PostgreSQL at {shown} ({why}) and no private cluster from {bindir}: {exc}")
    try:
        cluster.start()
        silent = _postgres_answers(cluster.url)
        if silent is not None:
            raise RuntimeError(f"it does not answer at {cluster.url}: {silent}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        _missing(f"no PostgreSQL at {shown} ({why}) and a private cluster from {bindir} did not start: {exc}")
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database for one test, dropped (WITH (FORCE)) afterwards."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"synthperf_test_{uuid.uuid4().hex[:16]}"
    admin = _postgres_admin_engine(postgres_server_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
            # Not UTC on purpose: production servers often run in local time, and timestamps must
            # round-trip whatever the session time zone is.
            conn.execute(text(f'ALTER DATABASE "{name}" SET timezone TO \'{POSTGRES_TEST_TIMEZONE}\''))
        url = make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
        try:
            yield url
        finally:
            from common.jobstore.db import get_engine

            get_engine(url).dispose()  # close the pooled connections of the engine cached for this URL
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def jobstore_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty job-store database (no tables yet), once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'js.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's SYNTHPERF_* settings, except the test-infrastructure ones."""
    keep = {"SYNTHPERF_TEST_REDIS_URL", "SYNTHPERF_TEST_POSTGRES_URL", "SYNTHPERF_REQUIRE_TOOLS",
            "SYNTHPERF_SLOW_SCALE", "SYNTHPERF_REALDATA", "SYNTHPERF_SCREENSHOTS"}
    for key in list(os.environ):
        if key.startswith("SYNTHPERF_") and key not in keep:
            monkeypatch.delenv(key, raising=False)
    # every test's service shares one per-machine inference-path measurement (models.tmax_ddpm.runtime)
    monkeypatch.setenv("SYNTHPERF_INFERENCE_CACHE_DIR", str(SHARED_RUNTIME_DIR))
    from common.config import get_settings

    get_settings.cache_clear()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding a slow test first, each file's tests kept together and in order.

    make test runs the files in parallel processes (pytest-xdist, a file per process at a time, handed
    out in collection order): a long file collected last, such as the worker-fault test, ran alone on
    one core for the last minute and a half. The Makefile passes --no-loadscope-reorder: by default
    pytest-xdist re-sorts the files by their number of tests, which undid this order.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group stays
