"""Schema set-up and the queries the gateway (SCP, completion) and the job views need.

``init_db(url)`` brings any database to the newest schema by running ``alembic upgrade head``
from the migrations packaged next to this module, so no alembic.ini is needed at run time.
Every process may call it at start-up: concurrent callers are serialised (a lock file next to
a SQLite database, an advisory lock on PostgreSQL), and an up-to-date database is a no-op.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from common.jobstore.db import get_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x5379_6E74  # "Synt": advisory-lock key for concurrent migrations


def alembic_config(url: str) -> Config:
    """An in-memory Alembic config pointing at the packaged migrations (no alembic.ini)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["url"] = url
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        db_path = Path(url[len("sqlite:///"):])
        db_path.parent.mkdir(parents=True, exist_ok=True)
        with open(db_path.with_name(db_path.name + ".migrate.lock"), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if url.startswith("postgresql"):
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
        return
    yield


def init_db(url: str) -> str | None:
    """Create or upgrade the job store at ``url`` to the newest schema; return the revision.

    Safe to call from every process at start-up (serialised, idempotent).
    """
    with _migration_lock(url):
        if current_revision(url) != head_revision():
            command.upgrade(alembic_config(url), "head")
    return current_revision(url)
