"""The packaged Alembic migrations build exactly the tables of common/jobstore/models.py, on SQLite
and on PostgreSQL (each test runs once per database, see ``jobstore_url`` in tests/conftest.py)."""

from __future__ import annotations

import threading

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from common.jobstore.db import get_engine
from common.jobstore.models import Base
from common.jobstore.queries import current_revision, head_revision, init_db


def test_init_db_creates_every_model_table(jobstore_url: str) -> None:
    url = jobstore_url
    assert init_db(url) == head_revision()
    tables = set(inspect(get_engine(url)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    with get_engine(url).connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == [], f"models.py and the migrations differ; add a revision: {diffs}"


def test_init_db_is_idempotent_and_concurrency_safe(jobstore_url: str) -> None:
    url = jobstore_url
    errors: list[BaseException] = []

    def run() -> None:
        try:
            init_db(url)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert current_revision(url) == head_revision()
    assert init_db(url) == head_revision()


def test_first_revision_is_0001() -> None:
    from alembic.script import ScriptDirectory

    from common.jobstore.queries import alembic_config

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    bases = script.get_bases()
    assert bases == ["0001"]
