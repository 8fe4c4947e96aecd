"""The Ledger: the one surface the rest of runner uses for budgets, runs, requests, money, answers
kept for reuse and the workers that send a run (synchronous; async code calls it in a thread, or
through `runner.ledger.writer.Writer`).

One calling convention: every operation is a method of `Ledger`. One that stands alone opens its own
transaction; one that the engine commits together with others takes the open transaction `tx` as
its first argument (`writer.submit(lambda tx: ledger.settle(tx, settlement))`). The SQL is plain
SQLite through the standard library's driver, or PostgreSQL through psycopg, behind one `Database`
protocol (runner.ledger.db); SQLAlchemy and alembic are loaded only to migrate.
"""

from __future__ import annotations

from runner.ledger.answers import AnswerOps
from runner.ledger.batches import BatchOps
from runner.ledger.books import BookOps
from runner.ledger.budgets import BudgetOps
from runner.ledger.kept import KeptOps
from runner.ledger.runs import RunOps
from runner.ledger.workers import WorkerOps


class Ledger(BudgetOps, AnswerOps, RunOps, WorkerOps, BookOps, KeptOps, BatchOps):
    """Budgets (budgets.py), money held and settled (holds.py), answers and quotes kept
    (answers.py), runs and requests (runs.py), workers (workers.py), the provider's books
    (books.py), answers kept through a ledger that could not be written (kept.py), provider
    batches (batches.py); opened and migrated in base.py."""


__all__ = ["Ledger"]
