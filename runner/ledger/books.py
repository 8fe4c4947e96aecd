"""The provider's books against the ledger: each request's attempts matched with what the provider
charged them, possibly billed money resolved."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from runner.ledger.base import LedgerBase
from runner.ledger.tx import Hold, Tx
from runner.ledger.views import ChargeCheck

# a line of a provider batch is charged under its batch's id and its custom_id
BATCH_KEYS = (
    "SELECT r.id, p.batch_id || '/' || r.custom_id FROM requests r JOIN batch_parts p ON p.id = r.batch_part"
    " WHERE r.run_id = ? AND p.batch_id IS NOT NULL"
)


def batch_charge_key(batch_id: str, custom_id: str) -> str:
    """How a batch line's charge is keyed (as `BATCH_KEYS` reads it from the ledger)."""
    return f"{batch_id}/{custom_id}"


class BookOps(LedgerBase):
    def batch_keys(self, run_id: str) -> list[str]:
        """The charge keys of the run's lines sent in provider batches."""
        with self.db.reading() as c:
            return [str(row[1]) for row in c.execute(BATCH_KEYS, (run_id,))]

    def check_charges(self, run_id: str, budget_id: int, charges: dict[str, int]) -> ChargeCheck:
        """Each request of the run against what its attempts were charged (`charges`: by client
        request id); a possibly billed one is resolved: charged, it failed at the provider's price;
        not charged, it goes back to pending. One transaction."""
        result = ChargeCheck()
        with self.transaction() as tx:
            rows = tx.conn.execute(
                "SELECT id, custom_id, state, reserved_nanos, possibly_billed_nanos, coalesce(price_nanos, 0)"
                " FROM requests WHERE run_id = ? AND cached_from IS NULL"
                " AND state IN ('ok', 'failed', 'possibly_billed') ORDER BY id",
                (run_id,),
            ).fetchall()
            charged_to: dict[int, int] = defaultdict(int)  # what each request's attempts were charged
            for request_id, cid in tx.conn.execute(
                "SELECT a.request_id, a.client_request_id FROM attempts a"
                " JOIN requests r ON r.id = a.request_id"
                " WHERE r.run_id = ? AND a.client_request_id IS NOT NULL",
                (run_id,),
            ):
                charged_to[request_id] += charges.get(cid, 0)
            for request_id, key in tx.conn.execute(BATCH_KEYS, (run_id,)):  # lines of provider batches
                charged_to[request_id] += charges.get(key, 0)
            for row_id, custom_id, state, held, earlier, price in rows:
                provider = charged_to[row_id]
                pending = earlier + (held if state == "possibly_billed" else 0)
                known = price if state == "ok" else 0
                if pending:
                    _resolve(tx, row_id, state, pending, provider, known, Hold(0, budget_id, run_id))
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
                (run_id,),
            ).fetchone()
        result.spent_nanos = int(spent)
        return result


def _resolve(tx: Tx, row_id: int, state: str, pending: int, provider: int, known: int, hold: Hold) -> None:
    """A request with money counted as possibly billed: the provider's books decide."""
    extra = max(0, provider - known)  # charged and not yet spent in the ledger
    tx.move_funds(hold.budget_id, spent=extra, possibly_billed=-pending)
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
    tx.entry("reconcile", extra, hold, row_id)
