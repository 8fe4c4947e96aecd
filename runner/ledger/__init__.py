"""The ledger: budgets, runs, requests and money, in SQLite or PostgreSQL. The rest of runner imports
only this package's names below, never its modules (tests/test_layout.py checks it)."""

from runner.ledger.base import OWNER_STALE_S, metadata_text, owner_alive
from runner.ledger.books import batch_charge_key
from runner.ledger.kept import KeptAnswer
from runner.ledger.seen import SeenKeys
from runner.ledger.store import Ledger
from runner.ledger.tx import CLIENT_REQUEST_ID, IDEMPOTENCY_KEY, Hold, Tx, client_request_id
from runner.ledger.views import BudgetView, PartView, RequestRow, RunView, Settlement
from runner.ledger.workers import WORKER_STALE_S, WorkerView, worker_name
from runner.ledger.writer import Writer

__all__ = [
    "CLIENT_REQUEST_ID",
    "IDEMPOTENCY_KEY",
    "OWNER_STALE_S",
    "WORKER_STALE_S",
    "BudgetView",
    "Hold",
    "KeptAnswer",
    "Ledger",
    "PartView",
    "RequestRow",
    "RunView",
    "SeenKeys",
    "Settlement",
    "Tx",
    "WorkerView",
    "Writer",
    "batch_charge_key",
    "client_request_id",
    "metadata_text",
    "owner_alive",
    "worker_name",
]
