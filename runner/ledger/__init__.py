"""The ledger: budgets, runs, requests and money, in SQLite (sqlmodel + alembic)."""

from runner.ledger.store import BudgetView, Ledger, RequestRow, RunView, Settlement

__all__ = ["BudgetView", "Ledger", "RequestRow", "RunView", "Settlement"]
