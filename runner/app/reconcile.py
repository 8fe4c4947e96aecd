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
from runner.ledger import BudgetView, Ledger, batch_charge_key
from runner.providers.batch import BatchClient, answered


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
    """{client request id: nano-USD charged} from the provider's transaction list (a batch line's
    charge under its batch id and custom_id)."""
    found: dict[str, int] = defaultdict(int)
    for t in transactions:
        cid = t.get("clientRequestId")
        batch, custom_id = t.get("batchId"), t.get("customId")
        if isinstance(batch, str) and batch and isinstance(custom_id, str):  # a line of a batch
            cid = batch_charge_key(batch, custom_id)
        if isinstance(cid, str) and cid:
            found[cid] += to_nanos(parse_usd(str(t.get("amount", "0"))))
    return found


def reconcile_with_charges(ledger: Ledger, run_id: str, charges: dict[str, int]) -> Reconciliation:
    """Compare each request of the run with what its attempts were charged; resolve the possibly
    billed ones (`Ledger.check_charges`: one transaction, all written or none of it)."""
    run = ledger.run(run_id)
    result = Reconciliation(run.id, ledger.budget_by_id(run.budget_id).name, "transactions")
    check = ledger.check_charges(run.id, run.budget_id, charges)
    result.matched, result.charged, result.not_charged = check.matched, check.charged, check.not_charged
    result.mismatched = check.mismatched
    result.ledger_nanos = check.spent_nanos
    keys = [*ledger.attempt_ids(run.id), *ledger.batch_keys(run.id)]  # every attempt and batch line
    result.provider_nanos = sum(charges.get(key, 0) for key in keys)
    return result


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


async def reconcile_batches(ledger: Ledger, run_id: str, client: BatchClient) -> Reconciliation:
    """A run's batch lines against the provider's output files: each answered line's price (its usage
    at batch prices) against what the ledger charged it; a line the ledger did not settle, or
    settled differently, is a mismatch. The run's calls, if any, have no books to compare here."""
    run = await anyio.to_thread.run_sync(ledger.run, run_id)
    budget = await anyio.to_thread.run_sync(ledger.budget_by_id, run.budget_id)
    result = Reconciliation(run.id, budget.name, "batch output")
    provider = ledger_side = 0
    for part in await anyio.to_thread.run_sync(ledger.parts, run.id):
        if part.batch_id is None:
            continue
        state = await client.retrieve(part.batch_id)
        charged = await anyio.to_thread.run_sync(ledger.part_prices, part.id)
        ledger_side += sum(charged.values())
        if state.output_file_id is None:
            continue
        async for line in client.lines(state.output_file_id):
            if not answered(line):
                continue
            custom_id = str(line.get("custom_id"))
            body = line["response"].get("body") or {}
            price = client.outcome(str(body.get("model")), line["response"], 0.0).price
            expected = 0 if price is None else to_nanos(price)
            provider += expected
            known = charged.get(custom_id)
            if known == expected:
                result.matched += 1
            else:
                result.mismatched.append((custom_id, known or 0, expected))
    result.ledger_nanos, result.provider_nanos = ledger_side, provider
    sync = run.spent_nanos - ledger_side
    if sync:
        result.note = f"the run's calls ({sync / 1e9:.6f} USD) are not in a batch's output: not compared"
    return result
