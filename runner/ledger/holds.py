"""A request's money: held before it is sent, settled, released or kept as possibly billed.

These take the open transaction (`tx`) first: the engine's writer commits many of them at once
(`Writer.submit(lambda tx: ledger.settle(tx, ...))`)."""

from __future__ import annotations

from typing import Any

from runner.core.errors import ProviderError
from runner.ledger.base import (
    IDS_IN_STATE,
    LedgerBase,
)
from runner.ledger.tx import NOW, Hold, Tx
from runner.ledger.views import Settlement


class HoldOps(LedgerBase):
    @staticmethod
    def reserve(tx: Tx, budget_id: int, run_id: str, request_id: int, amount: int) -> bool:
        """Hold `amount`: granted only if spent + reserved + possibly billed + amount <= limit."""
        if not tx.reserve_funds(budget_id, amount):
            return False
        tx.update_request(request_id, {"state": "reserved", "reserved_nanos": amount})
        tx.entry("reserve", amount, Hold(amount, budget_id, run_id), request_id)
        return True

    @staticmethod
    def reserve_and_send(
        tx: Tx, hold: Hold, request_id: int, *, worker: str, attempt: int = 1
    ) -> bool | None:
        """The request's first attempt: its quote held and the request marked `sending`, in the
        caller's transaction. None (nothing done) when the request is no longer pending and
        `worker`'s (the run's other workers took it over); False when the hold does not fit."""
        values: dict[str, Any] = {"state": "sending", "reserved_nanos": hold.amount, "attempts": attempt}
        if attempt == 1:
            values["started_at"] = NOW
        if not tx.update_request(request_id, values, " AND state = 'pending' AND worker_id = ?", worker):
            return None
        if not tx.reserve_funds(hold.budget_id, hold.amount):  # rare: put the row back as it was
            tx.update_request(request_id, {"state": "pending", "reserved_nanos": 0, "attempts": attempt - 1})
            return False
        tx.entry("reserve", hold.amount, hold, request_id)
        return True

    @staticmethod
    def mark_sending(tx: Tx, request_id: int, attempt: int) -> None:
        """Recorded before each send: a killed process leaves this, and resume reads it as unknown."""
        values: dict[str, Any] = {"state": "sending", "attempts": attempt}
        if attempt == 1:
            values["started_at"] = NOW
        tx.update_request(request_id, values)

    @staticmethod
    def settle(tx: Tx, settlement: Settlement) -> None:
        """The reservation becomes the real charge, with the response, in one transaction."""
        request_id, price = settlement.request_id, settlement.price_nanos
        hold = settlement.hold or tx.hold(request_id)
        values = {"state": "ok", "price_nanos": price, "finished_at": NOW, "reserved_nanos": 0}
        if tx.update_request(request_id, {**values, **settlement.fields}, " AND state != 'possibly_billed'"):
            tx.move_funds(hold.budget_id, reserved=-hold.amount, spent=price)
        else:  # its worker was taken for gone meanwhile, and its hold counted as possibly billed
            tx.update_request(request_id, {**values, **settlement.fields})
            tx.move_funds(hold.budget_id, possibly_billed=-hold.amount, spent=price)
        tx.entry("settle", price, hold, request_id)
        if hold.amount > price:
            tx.entry("release", hold.amount - price, hold, request_id)

    @staticmethod
    def release(tx: Tx, request_id: int, *, state: str, fields: dict[str, Any]) -> None:
        """Give back an unused reservation (the request failed before anything was billed)."""
        hold = tx.hold(request_id)
        values: dict[str, Any] = {"state": state, "finished_at": NOW, "reserved_nanos": 0, **fields}
        if tx.state(request_id) == "possibly_billed":  # its worker was taken for gone meanwhile
            tx.move_funds(hold.budget_id, possibly_billed=-hold.amount)
            values["worker_id"] = None  # back to the pool, if it goes back to pending
        else:
            tx.move_funds(hold.budget_id, reserved=-hold.amount)
        tx.update_request(request_id, values)
        if hold.amount:
            tx.entry("release", hold.amount, hold, request_id)

    @staticmethod
    def mark_possibly_billed(tx: Tx, request_id: int, fields: dict[str, Any]) -> None:
        """An unknown outcome: the reservation stays counted, as possibly billed."""
        if tx.state(request_id) == "possibly_billed":  # marked already (its worker was taken over)
            return
        hold = tx.hold(request_id)
        tx.move_funds(hold.budget_id, reserved=-hold.amount, possibly_billed=hold.amount)
        tx.update_request(request_id, {"state": "possibly_billed", "finished_at": NOW, **fields})
        tx.entry("possibly_billed", hold.amount, hold, request_id)

    @staticmethod
    def send_again(tx: Tx, request_id: int) -> None:
        """The user chose to re-send a possibly billed request: it goes back to pending, and what its
        earlier attempt held stays counted as possibly billed (it may have been charged) on the
        request and in the budget, until the provider's books say otherwise."""
        hold = tx.hold(request_id)
        earlier = tx.possibly_billed(request_id)
        values = {"state": "pending", "possibly_billed_nanos": earlier + hold.amount, "reserved_nanos": 0}
        values["worker_id"] = None  # any worker sends it
        tx.update_request(request_id, {**values, "finished_at": None})
        tx.entry("send_again", hold.amount, hold, request_id)

    @staticmethod
    def retry_failed(tx: Tx, run_id: str) -> int:
        """A run's failed requests (they held nothing) go back to pending; their attempts stay."""
        sql = (
            "UPDATE requests SET state = 'pending', finished_at = NULL, worker_id = NULL"
            " WHERE run_id = ? AND state = ?"
        )
        return int(tx.conn.execute(sql, (run_id, "failed")).rowcount)

    def possibly_billed(self, run_id: str, tx: Tx) -> list[int]:
        return [int(row[0]) for row in tx.conn.execute(IDS_IN_STATE, (run_id, "possibly_billed"))]

    @staticmethod
    def still_mine(tx: Tx, request_id: int, state: str, worker: str) -> bool:
        """Whether the request is still in `state` and this worker's (the others take a lapsed
        worker's requests over: its reserved and pending ones go back to the pool, those in flight
        are possibly billed)."""
        row = tx.conn.execute("SELECT state, worker_id FROM requests WHERE id = ?", (request_id,)).fetchone()
        return row is not None and row[0] == state and row[1] == worker

    @staticmethod
    def record_attempt(
        tx: Tx,
        request_id: int,
        number: int,
        outcome: str,
        error: ProviderError | None,
        latency_s: float | None,
    ) -> None:
        """An attempt of a request, with how it ended (ok, retry, fatal, unknown) and its error."""
        text = str(error)[:500] if error else None
        tx.attempt(request_id, number, outcome, error.status if error else 200, text, latency_s)
