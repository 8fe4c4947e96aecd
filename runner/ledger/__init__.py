"""The ledger: budgets, runs, requests and money, in SQLite (sqlmodel + alembic)."""

from runner.ledger.store import BudgetView, Ledger, Settlement

__all__ = ["BudgetView", "Ledger", "Settlement"]
