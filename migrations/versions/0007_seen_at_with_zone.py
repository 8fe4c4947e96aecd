"""runs.seen_at with its time zone, as every other timestamp of the ledger (PostgreSQL)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 21:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite keeps a timestamp as text either way: only PostgreSQL's column type changes
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "runs",
            "seen_at",
            type_=sqlmodel.sql.sqltypes.UTCDateTime(),
            existing_type=sa.DateTime(),
            postgresql_using="seen_at AT TIME ZONE 'UTC'",
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "runs", "seen_at", type_=sa.DateTime(), existing_type=sqlmodel.sql.sqltypes.UTCDateTime()
        )
