"""requests by line: exports and reports page through a run in line order

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 01:50:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_requests_run_line", "requests", ["run_id", "line"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_requests_run_line", table_name="requests")
