"""Gateway replica registry (issue 19): gateway_replicas, one row per running gateway, renewed with
its heartbeat; SQLite refuses a second live one, PostgreSQL runs several.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 19:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gateway_replicas",
        sa.Column("replica_id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("data_dir", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("replica_id"),
    )


def downgrade() -> None:
    op.drop_table("gateway_replicas")
