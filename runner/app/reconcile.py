"""Reconciliation: the ledger compared with the provider's own books.

Per request where the provider lists its charges (matched on the client request id each attempt was
sent with); by balance movement where it reports only a balance (recorded when a run began and ended).
Possibly billed requests are resolved: charged (the provider's amount is spent, the request is failed
with no answer: `charged_no_answer`) or not charged (the hold released, the request pending again, so
the next resume sends it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio

from runner.core.money import parse_usd, to_nanos
from runner.ledger import BudgetView, Ledger
from runner.ledger.tx import Hold, Tx


@dataclass
class Reconciliation:
    run_id: str
    budget: str
    method: str  # "transactions" | "balance" | "none"
    matched: int = 0  # requests whose charges agree with the ledger
    charged: int = 0  # possibly billed requests the provider charged
    not_charged: int = 0  # possibly billed requests it did not
    mismatched: list[tuple[str, int, int]] = field(default_factory=list)  # (custom_id, ledger, provider)
    ledger_nanos: int = 0  # what the ledger says the run spent (after resolving)
    provider_nanos: int | None = None  # what the provider's books say (charges, or balance delta)
    note: str = ""

    @property
    def difference_nanos(self) -> int | None:
        return None if self.provider_nanos is None else self.provider_nanos - self.ledger_nanos

    @property
    def ok(self) -> bool:
        return self.difference_nanos == 0 and not self.mismatched


@dataclass
class BudgetReconciliation:
    """Every run of a budget: the budget's spent against the provider's books for its runs."""

    budget: BudgetView
    runs: list[Reconciliation]

    @property
    def provider_nanos(self) -> int | None:
        figures = [r.provider_nanos for r in self.runs]
        return None if any(f is None for f in figures) else sum(f or 0 for f in figures)

    @property
    def difference_nanos(self) -> int | None:
        provider = self.provider_nanos
        return None if provider is None else provider - self.budget.spent_nanos

    @property
    def ok(self) -> bool:
        return self.difference_nanos in (0, None) and all(
            r.ok or r.difference_nanos is None for r in self.runs
        )


def charges_by_attempt(transactions: list[dict[str, Any]]) -> dict[str, int]:
    """{client request id: nano-USD charged} from the provider's transaction list."""
    found: dict[str, int] = defaultdict(int)
    for t in transactions:
        cid = t.get("clientRequestId")
        if isinstance(cid, str) and cid:
            found[cid] += to_nanos(parse_usd(str(t.get("amount", "0"))))
    return found


def reconcile_with_charges(ledger: Ledger, run_id: str, charges: dict[str, int]) -> Reconciliation:
    """Compare each request of the run with what its attempts were charged; resolve the possibly
    billed ones. One transaction: what it decides is all written or none of it."""
    run = ledger.run(run_id)
    result = Reconciliation(run.id, ledger.budget_by_id(run.budget_id).name, "transactions")
    with ledger.transaction() as tx:
        rows = tx.conn.execute(
            "SELECT id, custom_id, state, reserved_nanos, possibly_billed_nanos, coalesce(price_nanos, 0)"
            " FROM requests WHERE run_id = ? AND cached_from IS NULL"
            " AND state IN ('ok', 'failed', 'possibly_billed') ORDER BY id",
            (run.id,),
        ).fetchall()
        charged_to: dict[int, int] = defaultdict(int)  # what each request's attempts were charged
        for request_id, cid in tx.conn.execute(
            "SELECT a.request_id, a.client_request_id FROM attempts a JOIN requests r ON r.id = a.request_id"
            " WHERE r.run_id = ? AND a.client_request_id IS NOT NULL",
            (run.id,),
        ):
            charged_to[request_id] += charges.get(cid, 0)
        for row_id, custom_id, state, held, earlier, price in rows:
            provider = charged_to[row_id]
            pending = earlier + (held if state == "possibly_billed" else 0)
            known = price if state == "ok" else 0
            if pending:
                _resolve(tx, row_id, state, pending, provider, known, run.budget_id, run.id)
                if state == "possibly_billed":
                    if provider:
                        result.charged += 1
                    else:
                        result.not_charged += 1
            elif provider != known and not (state == "failed" and provider == price):
                result.mismatched.append((custom_id, known, provider))
            else:
                result.matched += 1
        (spent,) = tx.conn.execute(
            "SELECT coalesce(sum(price_nanos), 0) FROM requests WHERE run_id = ? AND cached_from IS NULL",
            (run.id,),
        ).fetchone()
    result.ledger_nanos = int(spent)
    result.provider_nanos = sum(
        charges.get(cid, 0)
        for cid in ledger.attempt_ids(run.id)  # every attempt of the run, whatever its row
    )
    return result


def _resolve(
    tx: Tx, row_id: int, state: str, pending: int, provider: int, known: int, budget_id: int, run_id: str
) -> None:
    """A request with money counted as possibly billed: the provider's books decide."""
    extra = max(0, provider - known)  # charged and not yet spent in the ledger
    tx.move_funds(budget_id, spent=extra, possibly_billed=-pending)
    values: dict[str, Any] = {
        "possibly_billed_nanos": 0,
        "reconciled": "charged" if provider else "not_charged",
    }
    if state == "possibly_billed":
        values["reserved_nanos"] = 0
        if provider:  # charged, and its answer never came: failed, at the provider's price
            values |= {"state": "failed", "price_nanos": provider, "error_type": "charged_no_answer"}
        else:  # never charged: sent again by the next resume
            values |= {"state": "pending", "error_type": None, "error_message": None, "finished_at": None}
            values["worker_id"] = None
    else:
        values["price_nanos"] = known + extra
    tx.update_request(row_id, values)
    tx.entry("reconcile", extra, Hold(0, budget_id, run_id), row_id)


def reconcile_by_balance(ledger: Ledger, run_id: str) -> Reconciliation:
    """Only a balance to go by: the run's spend against the balance's fall while it ran."""
    run = ledger.run(run_id)
    result = Reconciliation(run.id, ledger.budget_by_id(run.budget_id).name, "balance")
    before, after = ledger.run_balances(run.id)
    result.ledger_nanos = run.spent_nanos
    if before is None or after is None:
        result.note = "no balance was recorded when the run began and ended: nothing to compare"
        return result
    result.provider_nanos = before - after
    result.note = (
        "the provider reports a balance only: charges cannot be attributed per request (possibly billed "
        "requests stay so), and anything else spent on the account meanwhile shows as a difference"
    )
    return result


async def provider_books(provider: Any) -> list[dict[str, Any]] | None:
    """The provider's transaction list, or None when it offers none (a balance only)."""
    listing = getattr(provider, "transactions", None)
    if listing is None:
        return None
    result: list[dict[str, Any]] | None = await listing()
    return result


async def reconcile_run(ledger: Ledger, run_id: str, provider: Any) -> Reconciliation:
    books = await provider_books(provider)
    if books is None:
        return await anyio.to_thread.run_sync(reconcile_by_balance, ledger, run_id)
    charges = charges_by_attempt(books)
    return await anyio.to_thread.run_sync(reconcile_with_charges, ledger, run_id, charges)
