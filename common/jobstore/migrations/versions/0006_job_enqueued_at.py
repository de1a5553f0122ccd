"""jobs.enqueued_at (issue 19): when the completion loop handed the job to the broker. A job the
completion made but no loop has sent yet (NULL) is sent by the next pass of any gateway replica, so
a gateway that dies between committing a job and sending its task loses nothing.

Existing jobs count as sent (their creation time): they were sent, or are lost to a memory that no
longer exists either way, and an upgrade must not send every old queued job again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 20:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET enqueued_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("enqueued_at")
