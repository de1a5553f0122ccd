"""Alembic environment for the job store.

Run programmatically by ``common.jobstore.queries.init_db(url)``: the URL (or an open
connection) arrives through ``config.attributes`` so no alembic.ini is needed at run time.
``render_as_batch`` keeps ALTERs working on SQLite, the embedded default.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from common.jobstore.db import get_engine
from common.jobstore.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: call common.jobstore.queries.init_db(url)")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    with get_engine(_url()).connect() as conn:
        _run(conn)
        conn.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
