"""Shadow validation records (issue 17): shadow_records, one row per job with both a synthetic and a
DSC-derived Tmax map (Dice, volumes, DEFUSE-3 calls, model version).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shadow_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("dice_t6", sa.Float(), nullable=True),
        sa.Column("dice_t10", sa.Float(), nullable=True),
        sa.Column("synthetic_t6_ml", sa.Float(), nullable=False),
        sa.Column("real_t6_ml", sa.Float(), nullable=False),
        sa.Column("synthetic_t10_ml", sa.Float(), nullable=False),
        sa.Column("real_t10_ml", sa.Float(), nullable=False),
        sa.Column("core_ml", sa.Float(), nullable=False),
        sa.Column("synthetic_defuse3", sa.Boolean(), nullable=True),
        sa.Column("real_defuse3", sa.Boolean(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id"),
    )
    op.create_index(op.f("ix_shadow_records_at"), "shadow_records", ["at"], unique=False)
    op.create_index(op.f("ix_shadow_records_model_version"), "shadow_records", ["model_version"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_shadow_records_model_version"), table_name="shadow_records")
    op.drop_index(op.f("ix_shadow_records_at"), table_name="shadow_records")
    op.drop_table("shadow_records")
