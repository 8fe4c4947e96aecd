"""A run's provider batches: each part's lines held at batch prices before its file is uploaded, each
step recorded before the next is taken, and each line settled once by its custom_id.

A request in a part reads `batched` (its hold counted as reserved) until its line is settled (`ok`),
failed, or released back to `pending` (its batch expired or was cancelled before it completed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runner.ledger.db import parse_time
from runner.ledger.holds import HoldOps
from runner.ledger.tx import Hold
from runner.ledger.views import PART_COLUMNS, PartView, Settlement

PART_TIMES = ("created_at", "updated_at")


def _part(row: Sequence[Any]) -> PartView:
    values = dict(zip(PART_COLUMNS.split(", "), row, strict=True))
    for name in PART_TIMES:
        values[name] = parse_time(values[name])
    values["cancel"] = bool(values["cancel"])
    return PartView(**values)


class BatchOps(HoldOps):
    def set_run_mode(self, run_id: str, mode: str) -> None:
        with self.transaction() as tx:
            tx.conn.execute("UPDATE runs SET mode = ? WHERE id = ?", (mode, run_id))

    def pending_rows(self, run_id: str) -> dict[str, tuple[int, int, str]]:
        """The run's pending requests that can be held: {custom_id: (row id, quote, sha256)}."""
        sql = (
            "SELECT custom_id, id, quote_nanos, sha256 FROM requests WHERE run_id = ? AND state = 'pending'"
            " AND quote_nanos IS NOT NULL"
        )
        with self.db.reading() as c:
            return {str(r[0]): (int(r[1]), int(r[2]), str(r[3])) for r in c.execute(sql, (run_id,))}

    def hold_part(
        self, run_id: str, budget_id: int, rows: Sequence[tuple[int, int]], digest: str, size: int
    ) -> tuple[PartView, list[int]] | None:
        """A new part of the run holding `rows` ((row id, quote at batch prices), in file order): each
        held while it fits the budget, all in one transaction. The part and the rows held, or None
        when not even the first fits (or none is pending any more)."""
        with self.transaction() as tx:
            [number] = tx.conn.execute(
                "SELECT coalesce(max(number), 0) + 1 FROM batch_parts WHERE run_id = ?", (run_id,)
            ).fetchone()
            [part_id] = tx.conn.execute(
                "INSERT INTO batch_parts (run_id, number, state, lines, bytes, digest, completed, failed,"
                " cancel, created_at, updated_at) VALUES (?, ?, 'held', 0, ?, ?, 0, 0, ?, ?, ?) RETURNING id",
                (run_id, int(number), size, digest, False, tx.now, tx.now),
            ).fetchone()
            held: list[int] = []
            for row_id, quote in rows:
                values = {
                    "state": "batched",
                    "reserved_nanos": quote,
                    "batch_part": part_id,
                    "worker_id": None,
                }
                if not tx.update_request(row_id, values, " AND state = 'pending'"):
                    continue
                if not tx.reserve_funds(budget_id, quote):
                    tx.update_request(row_id, {"state": "pending", "reserved_nanos": 0, "batch_part": None})
                    break
                tx.entry("reserve", quote, Hold(quote, budget_id, run_id), row_id)
                held.append(row_id)
            if not held:
                tx.conn.execute("DELETE FROM batch_parts WHERE id = ?", (part_id,))
                return None
            tx.conn.execute("UPDATE batch_parts SET lines = ? WHERE id = ?", (len(held), part_id))
            sql = f"SELECT {PART_COLUMNS} FROM batch_parts WHERE id = ?"  # noqa: S608 - our names
            part = _part(tx.conn.execute(sql, (part_id,)).fetchone())
        return part, held

    def update_part(self, part_id: int, **values: Any) -> None:
        """Record a step of a part: its file id, its batch id, the provider's status and counts, its
        state, whether it is to be cancelled."""
        names = ", ".join(f"{name} = ?" for name in values)
        with self.transaction() as tx:
            tx.conn.execute(
                f"UPDATE batch_parts SET {names}, updated_at = ? WHERE id = ?",  # noqa: S608 - our names
                (*values.values(), tx.now, part_id),
            )

    def parts(self, run_id: str, *, open_only: bool = False) -> list[PartView]:
        where = " AND state != 'settled'" if open_only else ""
        sql = f"SELECT {PART_COLUMNS} FROM batch_parts WHERE run_id = ?{where} ORDER BY number"  # noqa: S608
        with self.db.reading() as c:
            return [_part(row) for row in c.execute(sql, (run_id,))]

    def part_rows(self, part_id: int, custom_ids: Sequence[str]) -> dict[str, tuple[int, str, int, int]]:
        """The part's requests still `batched`, of these custom_ids: {custom_id: (row id, model, hold,
        attempts made before)}."""
        sql = (
            "SELECT custom_id, id, model, reserved_nanos, attempts FROM requests WHERE batch_part = ?"
            " AND state = 'batched' AND custom_id IN ({})"
        )
        found = self._select_in(sql, custom_ids, part_id)
        return {str(r[0]): (int(r[1]), str(r[2]), int(r[3]), int(r[4])) for r in found}

    def unfinished_lines(self, run_id: str) -> int:
        """The run's lines still to be answered: pending, or in a batch."""
        sql = "SELECT count(*) FROM requests WHERE run_id = ? AND state IN ('pending', 'batched')"
        with self.db.reading() as c:
            return int(c.execute(sql, (run_id,)).fetchone()[0])

    def held_unfinished(self, run_id: str) -> int:
        """What the run's lines in batches hold."""
        sql = "SELECT coalesce(sum(reserved_nanos), 0) FROM requests WHERE run_id = ? AND state = 'batched'"
        with self.db.reading() as c:
            return int(c.execute(sql, (run_id,)).fetchone()[0])

    def unfinished_ids(self, run_id: str, custom_ids: Sequence[str]) -> set[str]:
        """Which of these lines of the run are still to be answered (pending, or in a batch)."""
        sql = (
            "SELECT custom_id FROM requests WHERE run_id = ? AND state IN ('pending', 'batched')"
            " AND custom_id IN ({})"
        )
        return {str(r[0]) for r in self._select_in(sql, custom_ids, run_id)}

    def recent_latency(self, scope: str, last: int = 200) -> float | None:
        """The median time of the last calls (not batch lines) answered on this provider, if any (in
        its five newest runs: a bounded read, whatever the ledger holds)."""
        sql = (
            "SELECT latency_s FROM requests WHERE run_id IN (SELECT id FROM runs WHERE provider = ?"
            " ORDER BY created_at DESC LIMIT 5) AND state = 'ok' AND latency_s IS NOT NULL"
            " AND coalesce(mode, 'sync') = 'sync' ORDER BY finished_at DESC LIMIT ?"
        )
        with self.db.reading() as c:
            times = sorted(float(r[0]) for r in c.execute(sql, (scope, last)))
        return times[len(times) // 2] if times else None

    def batched_left(self, part_id: int) -> list[int]:
        """The part's requests no output line has settled yet."""
        sql = "SELECT id FROM requests WHERE batch_part = ? AND state = 'batched'"
        with self.db.reading() as c:
            return [int(r[0]) for r in c.execute(sql, (part_id,))]

    def settle_lines(self, settlements: Sequence[Settlement], attempts: Sequence[tuple[int, float]]) -> None:
        """Answered lines of a part, each charged at its price (its hold released), in one transaction;
        a line settled already (read again after a crash) is left as it is."""
        with self.transaction() as tx:
            for settlement, (number, latency) in zip(settlements, attempts, strict=True):
                if tx.state(settlement.request_id) != "batched":
                    continue
                tx.attempt(settlement.request_id, number, "ok", 200, None, latency)
                self.settle(tx, settlement)

    def release_lines(self, rows: Sequence[tuple[int, str, dict[str, Any]]]) -> None:
        """Lines of a part that were not answered, each (row id, state, fields): `pending` to be sent
        again (its batch expired or was cancelled first), or `failed` with its error."""
        with self.transaction() as tx:
            for row_id, state, fields in rows:
                if tx.state(row_id) != "batched":
                    continue
                if state == "failed":
                    number = int(fields.get("attempts") or 1)
                    tx.attempt(row_id, number, "fatal", None, fields.get("error_message"), None)
                extra = {"batch_part": None, "finished_at": None} if state == "pending" else {}
                self.release(tx, row_id, state=state, fields={**fields, **extra})

    def requote(self, run_id: str, quotes: Sequence[tuple[int, int]]) -> None:
        """Pending requests' quotes made again (at synchronous prices, for a run that switches from
        batches to calls): (row id, quote)."""
        with self.transaction() as tx:
            for row_id, quote in quotes:
                tx.update_request(
                    row_id, {"quote_nanos": quote}, " AND state = 'pending' AND run_id = ?", run_id
                )

    def by_mode(self, run_id: str) -> list[tuple[str, int, int, int]]:
        """The run's answers bought, by mode: (sync | batch, answers, charged, what they cost as calls)."""
        sql = (
            "SELECT mode, count(*), coalesce(sum(price_nanos), 0),"
            " coalesce(sum(coalesce(sync_price_nanos, price_nanos)), 0) FROM requests"
            " WHERE run_id = ? AND state = 'ok' AND mode IS NOT NULL GROUP BY mode ORDER BY mode"
        )
        with self.db.reading() as c:
            return [(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in c.execute(sql, (run_id,))]

    def part_prices(self, part_id: int) -> dict[str, int]:
        """What the ledger charged each answered line of a part, by custom_id."""
        sql = "SELECT custom_id, price_nanos FROM requests WHERE batch_part = ? AND state = 'ok'"
        with self.db.reading() as c:
            return {str(r[0]): int(r[1] or 0) for r in c.execute(sql, (part_id,))}
