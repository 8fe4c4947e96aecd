"""provider batches: a run's batch parts, the part a request is in, how each answer was bought

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 08:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_parts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("file_id", sa.String(), nullable=True),
        sa.Column("batch_id", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=True),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("cancel", sa.Boolean(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "number"),
    )
    op.create_index("ix_batch_parts_run_id", "batch_parts", ["run_id"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("mode", sa.String(), nullable=True))  # sync | batch
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("batch_part", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("mode", sa.String(), nullable=True))
        batch.add_column(sa.Column("sync_price_nanos", sa.BigInteger(), nullable=True))
    op.create_index("ix_requests_batch_part", "requests", ["batch_part"])


def downgrade() -> None:
    op.drop_index("ix_requests_batch_part", "requests")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("sync_price_nanos")
        batch.drop_column("mode")
        batch.drop_column("batch_part")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("mode")
    op.drop_index("ix_batch_parts_run_id", "batch_parts")
    op.drop_table("batch_parts")
