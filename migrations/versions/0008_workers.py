"""one run, many workers: the workers of a run, the chunks they claim, limits kept for the whole run

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 22:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("seen_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.Column("ok", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_workers_run_id", "workers", ["run_id"])
    op.create_table(
        "run_limits",
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("level", sa.BigInteger(), nullable=False),
        sa.Column("stamp", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("run_id", "name"),
    )
    with op.batch_alter_table("runs") as batch:
        # the next chunk of the job's lines a worker claims (counted from 0 by every session of the run)
        batch.add_column(sa.Column("next_chunk", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("requests") as batch:
        # the worker that claimed the request (its chunk), until it is finished or taken over
        batch.add_column(sa.Column("worker_id", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("worker_id")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("next_chunk")
    op.drop_table("run_limits")
    op.drop_index("ix_workers_run_id", "workers")
    op.drop_table("workers")
