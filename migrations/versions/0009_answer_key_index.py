"""answers found by their key alone: the index no longer holds the request's state

The index of cached answers was on (answer_key, state), so every request's move from pending to
sending to ok moved its entry twice. On (answer_key) alone it is written once, when the row is made;
the lookups filter the state of the few rows a key finds. benchmarks/latency.py --provider openai
(20,000 calls): the ledger writer's CPU 1.19 s -> 1.0 s.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 01:55:00
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_requests_answer", "requests")
    op.create_index("ix_requests_answer_key", "requests", ["answer_key"])


def downgrade() -> None:
    op.drop_index("ix_requests_answer_key", "requests")
    op.create_index("ix_requests_answer", "requests", ["answer_key", "state"])
