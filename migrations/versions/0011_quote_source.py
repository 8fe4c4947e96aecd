"""how each request was quoted: a dry run, a price table's bound, or the bound with the prompt counted
by the server (`tokenized`); and the answer's bound in tokens (what the expected cost learns from)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("quote_source", sa.String(), nullable=True))
        batch.add_column(sa.Column("output_bound", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("output_bound")
        batch.drop_column("quote_source")
