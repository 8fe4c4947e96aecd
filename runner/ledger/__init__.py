"""The ledger: budgets, runs, requests and money, in SQLite (sqlmodel + alembic)."""

from runner.ledger.store import Ledger
from runner.ledger.views import BudgetView, RequestRow, RunView, Settlement

__all__ = ["BudgetView", "Ledger", "RequestRow", "RunView", "Settlement"]
