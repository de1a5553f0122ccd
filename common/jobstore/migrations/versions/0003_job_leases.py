"""Job leases for worker liveness (issue 16): jobs.lease_owner, jobs.lease_until.

A running job's worker renews its lease every few seconds; the reaper re-queues a job whose lease
expired (common/jobstore/leases.py). The new job state "poisoned" is a value, not a schema change.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-20 14:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_lease_until"), ["lease_until"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_lease_until"))
        batch_op.drop_column("lease_until")
        batch_op.drop_column("lease_owner")
