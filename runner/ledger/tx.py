"""One ledger write transaction, buffered: totals read once, every row written by executemany at the end.

The money operations of a batch (reserve, settle, release, possibly billed) touch the same budget row
and hundreds of request rows. Issued one statement at a time that is several round trips into SQLite per
request; here a transaction instead

- reads each budget's totals once, keeps them in Python and writes them back once;
- merges the updates to each request row in order (a later value wins, as sequential UPDATEs would);
- appends ledger entries and attempts to lists;

and `flush()` writes all of it just before the commit. This is sound because the transaction began with
`BEGIN IMMEDIATE`: no other process can write between our read of a total and our write of it (on a
server database the read would need `SELECT ... FOR UPDATE`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from runner.ledger.db import time_text, utcnow

NOW = object()  # stands for "the time of this write" in request updates


@dataclass(slots=True)
class Totals:
    limit: int
    spent: int
    reserved: int
    possibly_billed: int

    def fits(self, amount: int) -> bool:
        return self.spent + self.reserved + self.possibly_billed + amount <= self.limit


@dataclass(frozen=True, slots=True)
class Hold:
    """What a request holds: the amount, and the budget and run it is held against."""

    amount: int
    budget_id: int
    run_id: str


class Tx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.now = now_text()
        self._totals: dict[int, Totals] = {}
        self._holds: dict[int, Hold] = {}
        self._updates: dict[int, dict[str, Any]] = {}
        self._entries: list[tuple[int, str, int, str, str | None, int | None]] = []
        self._attempts: list[tuple[int, int, str, int | None, str | None, float | None, str]] = []

    # ---- reads, cached for the rest of the transaction ----------------------------------

    def totals(self, budget_id: int) -> Totals:
        found = self._totals.get(budget_id)
        if found is None:
            row = self._one(
                "SELECT limit_nanos, spent_nanos, reserved_nanos, possibly_billed_nanos FROM budgets"
                " WHERE id = ?",
                budget_id,
                "budget",
            )
            found = self._totals[budget_id] = Totals(*(int(v) for v in row))
        return found

    def hold(self, request_id: int) -> Hold:
        found = self._holds.get(request_id)
        if found is None:
            row = self._one(
                "SELECT requests.reserved_nanos, runs.budget_id, requests.run_id FROM requests"
                " JOIN runs ON runs.id = requests.run_id WHERE requests.id = ?",
                request_id,
                "request",
            )
            found = self._holds[request_id] = Hold(int(row[0]), int(row[1]), str(row[2]))
        return found

    def possibly_billed(self, request_id: int) -> int:
        """What earlier attempts of a request hold as possibly billed, as this transaction leaves it."""
        found = self._updates.get(request_id, {}).get("possibly_billed_nanos")
        if found is None:
            sql = "SELECT possibly_billed_nanos FROM requests WHERE id = ?"
            found = self._one(sql, request_id, "request")[0]
        return int(found)

    def state(self, request_id: int) -> str:
        """A request's state as this transaction leaves it so far."""
        found = self._updates.get(request_id, {}).get("state")
        if found is None:
            found = self._one("SELECT state FROM requests WHERE id = ?", request_id, "request")[0]
        return str(found)

    def _one(self, sql: str, key: int, what: str) -> tuple[Any, ...]:
        """The one row `sql` finds for `key`; a missing row is a defect (ids come from the ledger)."""
        row: tuple[Any, ...] | None = self.conn.execute(sql, (key,)).fetchone()
        if row is None:
            msg = f"no {what} with id {key}"
            raise LookupError(msg)
        return row

    # ---- buffered writes ----------------------------------------------------------------

    def set_hold(self, request_id: int, hold: Hold) -> None:
        self._holds[request_id] = hold
        self.update_request(request_id, {"reserved_nanos": hold.amount})

    def update_request(self, request_id: int, values: dict[str, Any]) -> None:
        self._updates.setdefault(request_id, {}).update(values)

    def entry(self, kind: str, amount: int, hold: Hold, request_id: int | None) -> None:
        self._entries.append((hold.budget_id, kind, amount, self.now, hold.run_id, request_id))

    def budget_entry(self, budget_id: int, kind: str, amount: int) -> None:
        self._entries.append((budget_id, kind, amount, self.now, None, None))

    def attempt(
        self,
        request_id: int,
        number: int,
        outcome: str,
        status: int | None,
        error: str | None,
        latency_s: float | None,
    ) -> None:
        self._attempts.append((request_id, number, outcome, status, error, latency_s, self.now))

    def flush(self) -> None:
        """Write what the transaction buffered; called once, just before the commit."""
        sql = self.conn.executemany
        if self._totals:
            sql(
                "UPDATE budgets SET spent_nanos = ?, reserved_nanos = ?, possibly_billed_nanos = ?"
                " WHERE id = ?",
                [(t.spent, t.reserved, t.possibly_billed, key) for key, t in self._totals.items()],
            )
        by_columns: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for request_id, values in self._updates.items():
            params = tuple(self.now if v is NOW else v for v in values.values())
            by_columns.setdefault(tuple(values), []).append((*params, request_id))
        for columns, rows in by_columns.items():
            names = ", ".join(f"{name} = ?" for name in columns)
            sql(f"UPDATE requests SET {names} WHERE id = ?", rows)  # noqa: S608 - the column names are ours
        if self._entries:
            sql(
                "INSERT INTO ledger_entries (budget_id, kind, amount_nanos, at, run_id, request_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                self._entries,
            )
        if self._attempts:
            sql(
                "INSERT INTO attempts (request_id, number, outcome, status, error, latency_s, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                self._attempts,
            )
        self._totals.clear()
        self._updates.clear()
        self._entries.clear()
        self._attempts.clear()


def now_text() -> str:
    """UTC now, in the ledger's stored form."""
    return time_text(utcnow())
