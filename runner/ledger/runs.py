"""Runs and their requests: made, read, finished."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from runner.core.errors import (
    LedgerError,
)
from runner.ledger.base import (
    OWNER_STALE_S,
    RUN_TIMES,
    LedgerBase,
    owner_alive,
)
from runner.ledger.db import parse_time, rows_as_dicts
from runner.ledger.views import RUN_COLUMNS, RequestRow, RunView


class RunOps(LedgerBase):
    def create_run(
        self,
        run_id: str,
        job_path: str,
        budget_id: int,
        provider: str,
        owner: str | None = None,
        state: str = "running",
        *,
        join: bool = False,
    ) -> str | None:
        """A new run. With `join`, a run of the same job and provider another live process is
        preparing is found instead (workers started together make one run): its id is returned,
        and no run is made."""
        with self.transaction() as tx:
            if join:
                found = tx.conn.execute(
                    "SELECT id, owner, seen_at FROM runs WHERE job_path = ? AND provider = ?"
                    " AND state = 'preparing' ORDER BY created_at DESC LIMIT 1",
                    (job_path, provider),
                ).fetchone()
                if found and found[1] and owner_alive(str(found[1]), parse_time(found[2]), OWNER_STALE_S):
                    return str(found[0])
            tx.conn.execute(
                "INSERT INTO runs (id, job_path, budget_id, provider, state, total, created_at, owner,"
                " seen_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (run_id, job_path, budget_id, provider, state, tx.now, owner, tx.now if owner else None),
            )
        return None

    def add_requests(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            names = list(rows[0])  # the keys of every row, in one order
            # a custom_id already in the run is left as it is: each line's hash is checked before it is sent
            sql = (
                f"INSERT INTO requests ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608 - our names
                " ON CONFLICT (run_id, custom_id) DO NOTHING"
            )
            with self.transaction() as tx:
                tx.conn.executemany(sql, [tuple(row[n] for n in names) for row in rows])

    def set_total(self, run_id: str, total: int) -> None:
        """Every line has its row: the run is complete, and ready to send."""
        with self.transaction() as tx:
            tx.conn.execute("UPDATE runs SET total = ?, state = 'running' WHERE id = ?", (total, run_id))

    def discard_run(self, run_id: str) -> None:
        """Remove a run that never sent anything (refused by its budget, or left while preparing)."""
        with self.transaction() as tx:
            [held] = tx.conn.execute(
                "SELECT count(*) FROM requests WHERE run_id = ?"
                " AND state NOT IN ('pending', 'skipped', 'copy')",
                (run_id,),
            ).fetchone()
            if held:
                msg = f"run {run_id} has sent requests: it is kept"
                raise LedgerError(msg)
            for table in ("requests", "workers", "run_limits"):
                tx.conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))  # noqa: S608 - our names
            tx.conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def finish_run(self, run_id: str, state: str, reason: str | None = None) -> None:
        with self.transaction() as tx:
            tx.conn.execute(
                "UPDATE runs SET state = ?, reason = ?, finished_at = ?, owner = NULL WHERE id = ?",
                (state, reason, tx.now, run_id),
            )

    def latest_run(self, job_path: str, provider: str) -> str | None:
        """The job's newest run on this provider: resumed by default (a finished one sends nothing)."""
        query = "SELECT id FROM runs WHERE job_path = ? AND provider = ? ORDER BY created_at DESC LIMIT 1"
        with self.db.reading() as c:
            row = c.execute(query, (job_path, provider)).fetchone()
        return None if row is None else str(row[0])

    def run(self, run_id: str) -> RunView:
        """A run (named by its id or the start of it) with its request counts by state and spend."""
        with self.db.reading() as c:
            # a prefix compared as text: LIKE would read '_' and '%' in what the user typed as wildcards
            where = "substr(id, 1, length(CAST(? AS TEXT))) = ? ORDER BY created_at DESC LIMIT 1"
            query = f"SELECT {RUN_COLUMNS} FROM runs WHERE {where}"  # noqa: S608 - our names
            row = c.execute(query, (run_id, run_id)).fetchone()
            if row is None:
                msg = f"no run '{run_id}' (see `runner runs`)"
                raise LedgerError(msg)
            counts = c.execute(
                "SELECT state, count(*), coalesce(sum(price_nanos), 0) FROM requests WHERE run_id = ?"
                " GROUP BY state",
                (row[0],),
            ).fetchall()
        values = dict(zip(RUN_COLUMNS.split(", "), row, strict=True))
        for name in RUN_TIMES:
            values[name] = parse_time(values[name])
        states = {state: int(n) for state, n, _ in counts}
        return RunView(**values, states=states, spent_nanos=sum(int(s) for _, _, s in counts))

    def runs(self) -> list[RunView]:
        with self.db.reading() as c:
            ids = [row[0] for row in c.execute("SELECT id FROM runs ORDER BY created_at DESC")]
        return [self.run(run_id) for run_id in ids]

    def request_rows(self, run_id: str, custom_ids: Sequence[str]) -> dict[str, RequestRow]:
        """What the ledger holds for these lines of a run, by custom_id."""
        sql = (
            "SELECT id, custom_id, sha256, state, quote_nanos, attempts, worker_id FROM requests"
            " WHERE run_id = ? AND custom_id IN ({})"
        )
        return {row[1]: RequestRow(*row) for row in self._select_in(sql, custom_ids, run_id)}

    def over_hold(self, run_id: str) -> int:
        """The run's requests charged above what they held (their quote)."""
        sql = "SELECT count(*) FROM requests WHERE run_id = ? AND state = 'ok' AND price_nanos > quote_nanos"
        with self.db.reading() as c:
            return int(c.execute(sql, (run_id,)).fetchone()[0])

    def pending_quote_nanos(self, run_id: str) -> int:
        query = "SELECT coalesce(sum(quote_nanos), 0) FROM requests WHERE run_id = ? AND state = 'pending'"
        with self.db.reading() as c:
            return int(c.execute(query, (run_id,)).fetchone()[0])

    def iter_request_tuples(
        self, run_id: str, columns: Sequence[str], batch: int = 50_000
    ) -> Iterator[list[tuple[Any, ...]]]:
        """Some columns of a run's requests as plain tuples, in line order, a batch at a time: the fast
        path for exports (no row objects; datetimes stay in their stored text form)."""
        names = list(columns)
        extra = "line" not in names  # paging goes by line: read it, and cut it off again, if not asked
        at = 0 if extra else names.index("line")
        listed = ", ".join(["line", *names] if extra else names)  # our code's names, never input
        sql = f"SELECT {listed} FROM requests WHERE run_id = ? AND line > ? ORDER BY line LIMIT ?"  # noqa: S608
        last = -1
        with self.db.reading() as c:
            while True:
                rows = c.execute(sql, (run_id, last, batch)).fetchall()
                if not rows:
                    return
                last = rows[-1][at]
                yield [row[1:] for row in rows] if extra else rows

    def iter_request_rows(self, run_id: str, batch: int = 5000) -> Iterator[list[dict[str, Any]]]:
        """All request rows of a run, in line order, a batch at a time (memory stays flat)."""
        last = -1
        sql = "SELECT * FROM requests WHERE run_id = ? AND line > ? ORDER BY line LIMIT ?"
        with self.db.reading() as c:
            while True:
                rows = rows_as_dicts(
                    c.execute(sql, (run_id, last, batch)), times=("started_at", "finished_at")
                )
                if not rows:
                    return
                yield rows
                last = rows[-1]["line"]

    def attempt_ids(self, run_id: str) -> list[str]:
        """The client request ids of every attempt the run made."""
        with self.db.reading() as c:
            rows = c.execute(
                "SELECT a.client_request_id FROM attempts a JOIN requests r ON r.id = a.request_id"
                " WHERE r.run_id = ? AND a.client_request_id IS NOT NULL",
                (run_id,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def run_balances(self, run_id: str) -> tuple[int | None, int | None]:
        """The provider's balance when the run began and when it last ended (nano-USD)."""
        with self.db.reading() as c:
            row = c.execute(
                "SELECT balance_before_nanos, balance_after_nanos FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    def set_run_balance(self, run_id: str, *, before: int | None = None, after: int | None = None) -> None:
        """Record the provider's balance at a run's start (kept from its first start) or end."""
        with self.transaction() as tx:
            if before is not None:
                tx.conn.execute(
                    "UPDATE runs SET balance_before_nanos = coalesce(balance_before_nanos, ?) WHERE id = ?",
                    (before, run_id),
                )
            if after is not None:
                tx.conn.execute("UPDATE runs SET balance_after_nanos = ? WHERE id = ?", (after, run_id))
