"""One ledger write transaction: every statement runs when it is called, so each read sees what the
transaction wrote before it.

Money moves as relative updates of a budget's columns (`reserved = reserved + ?`), and a reservation
is one conditional UPDATE that only succeeds while spent + reserved + possibly billed + the amount
stays within the limit: the check and the write are one statement, atomic on SQLite (the writer holds
the database) and on a server database (the row is locked by the UPDATE) alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.ledger.db import Connection, time_text, utcnow

NOW = object()  # stands for "the time of this write" in request updates
CLIENT_REQUEST_ID = "X-Client-Request-Id"  # an attempt's id, sent with it; the attempts table keeps it
IDEMPOTENCY_KEY = "Idempotency-Key"  # the request's, the same for all its attempts


def client_request_id(run_id: str, row_id: int, number: int) -> str:
    """An attempt's id: its run, its request's row and its number (as `Tx.attempt` stores it)."""
    return f"{run_id}-{row_id}-{number}"


RESERVE = (
    "UPDATE budgets SET reserved_nanos = reserved_nanos + ? WHERE id = ?"
    " AND spent_nanos + reserved_nanos + possibly_billed_nanos + ? <= limit_nanos"
)
MOVE = (
    "UPDATE budgets SET reserved_nanos = reserved_nanos + ?, spent_nanos = spent_nanos + ?,"
    " possibly_billed_nanos = possibly_billed_nanos + ? WHERE id = ?"
)
HOLD = (
    "SELECT requests.reserved_nanos, runs.budget_id, requests.run_id FROM requests"
    " JOIN runs ON runs.id = requests.run_id WHERE requests.id = ?"
)


@dataclass(frozen=True, slots=True)
class Hold:
    """What a request holds: the amount, and the budget and run it is held against."""

    amount: int
    budget_id: int
    run_id: str


ENTRY = (
    "INSERT INTO ledger_entries (budget_id, kind, amount_nanos, at, run_id, request_id)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
ATTEMPT = (
    "INSERT INTO attempts (request_id, number, outcome, status, error, latency_s, at, client_request_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, (SELECT run_id FROM requests WHERE id = ?) || '-' || ? || '-' || ?)"
)


_UPDATES: dict[tuple[str, ...], str] = {}  # request UPDATEs by (their columns..., their condition)


class Tx:
    """The ledger's history rows (budget entries, attempts) are written at the end of the
    transaction, each table in one statement (`flush`): nothing reads them in the transaction that
    writes them, and on PostgreSQL every statement is a round trip (a grouped commit of 512
    requests made about 1,500 of them for these rows alone)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.now = now_text()
        self._entries: list[tuple[Any, ...]] = []
        self._attempts: list[tuple[Any, ...]] = []

    def flush(self) -> None:
        """Write the history rows kept so far (called before the transaction commits)."""
        if self._entries:
            self.conn.executemany(ENTRY, self._entries)
            self._entries = []
        if self._attempts:
            self.conn.executemany(ATTEMPT, self._attempts)
            self._attempts = []

    # ---- reads --------------------------------------------------------------------------

    def hold(self, request_id: int) -> Hold:
        amount, budget_id, run_id = self._one(HOLD, request_id)
        return Hold(int(amount), int(budget_id), str(run_id))

    def possibly_billed(self, request_id: int) -> int:
        """What earlier attempts of a request hold as possibly billed."""
        return int(self._one("SELECT possibly_billed_nanos FROM requests WHERE id = ?", request_id)[0])

    def state(self, request_id: int) -> str:
        return str(self._one("SELECT state FROM requests WHERE id = ?", request_id)[0])

    def _one(self, sql: str, key: int) -> tuple[Any, ...]:
        """The one row `sql` finds for `key`; a missing row is a defect (ids come from the ledger)."""
        row: tuple[Any, ...] | None = self.conn.execute(sql, (key,)).fetchone()
        if row is None:
            msg = f"no row with id {key} for: {sql}"
            raise LookupError(msg)
        return row

    # ---- writes -------------------------------------------------------------------------

    def reserve_funds(self, budget_id: int, amount: int) -> bool:
        """Add `amount` to the budget's reservations if it fits under the limit."""
        return self.conn.execute(RESERVE, (amount, budget_id, amount)).rowcount == 1

    def move_funds(
        self, budget_id: int, *, reserved: int = 0, spent: int = 0, possibly_billed: int = 0
    ) -> None:
        self.conn.execute(MOVE, (reserved, spent, possibly_billed, budget_id))

    def update_request(self, request_id: int, values: dict[str, Any], where: str = "", *args: Any) -> bool:
        """Set `values` on the request (only if `where`, SQL on its columns with `args`, holds);
        whether it was updated."""
        shape = (*values, where)
        sql = _UPDATES.get(shape)
        if sql is None:  # a few shapes, each made once (a settlement names 18 columns)
            names = ", ".join(f"{name} = ?" for name in values)
            sql = _UPDATES[shape] = f"UPDATE requests SET {names} WHERE id = ?{where}"  # noqa: S608
        params = [self.now if v is NOW else v for v in values.values()]
        return bool(self.conn.execute(sql, (*params, request_id, *args)).rowcount)

    def entry(self, kind: str, amount: int, hold: Hold, request_id: int | None) -> None:
        self._entry(hold.budget_id, kind, amount, hold.run_id, request_id)

    def budget_entry(self, budget_id: int, kind: str, amount: int) -> None:
        self._entry(budget_id, kind, amount, None, None)

    def _entry(
        self, budget_id: int, kind: str, amount: int, run_id: str | None, request_id: int | None
    ) -> None:
        self._entries.append((budget_id, kind, amount, self.now, run_id, request_id))

    def attempt(
        self,
        request_id: int,
        number: int,
        outcome: str,
        status: int | None,
        error: str | None,
        latency_s: float | None,
    ) -> None:
        self._attempts.append(
            (request_id, number, outcome, status, error, latency_s, self.now, request_id, request_id, number)
        )


def now_text() -> str:
    """UTC now, in the ledger's stored form."""
    return time_text(utcnow())
