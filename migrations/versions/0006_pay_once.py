"""pay once: answers reused from the ledger, client request ids, balances around a run

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        # the body's hash, with the line's sample mark when it has one: what an answer is reused by
        batch.add_column(sa.Column("answer_key", sa.String(), nullable=True))
        # the request whose answer this one reuses (from an earlier run, or an identical line)
        batch.add_column(sa.Column("cached_from", sa.Integer(), nullable=True))
        # what the provider's books said of a possibly billed request: charged | not_charged
        batch.add_column(sa.Column("reconciled", sa.String(), nullable=True))
    op.create_index("ix_requests_answer", "requests", ["answer_key", "state"])
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("client_request_id", sa.String(), nullable=True))
    op.create_index("ix_attempts_client_request_id", "attempts", ["client_request_id"])
    with op.batch_alter_table("runs") as batch:
        # the provider's balance when the run began and ended (reconciliation by balance movement)
        batch.add_column(sa.Column("balance_before_nanos", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("balance_after_nanos", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("balance_after_nanos")
        batch.drop_column("balance_before_nanos")
    op.drop_index("ix_attempts_client_request_id", "attempts")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("client_request_id")
    op.drop_index("ix_requests_answer", "requests")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("reconciled")
        batch.drop_column("cached_from")
        batch.drop_column("answer_key")
