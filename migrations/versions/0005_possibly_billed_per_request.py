"""possibly billed money per request: what earlier attempts of a re-sent request may have cost

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(
            sa.Column("possibly_billed_nanos", sa.BigInteger(), nullable=False, server_default="0")
        )
    # a request possibly billed before this revision carries its hold in reserved_nanos, as before


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("possibly_billed_nanos")
