"""The Ledger: open + migrate, budgets, reservations, settlements, runs and quotes (synchronous).

Every write goes through `transaction()`, which starts with BEGIN IMMEDIATE, so a check and the write
that depends on it cannot interleave with another process. Async code reaches the ledger through
`runner.ledger.writer.Writer`, which groups writes into one commit per batch in a thread. The SQL is
plain SQLite through the standard library's driver (`runner.ledger.db`); SQLAlchemy and alembic are
loaded only to migrate a ledger that is not at the newest migration.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs

from runner.core.errors import (
    BudgetLimitTooLow,
    BudgetNotFound,
    ConfigError,
    LedgerError,
    LedgerUnavailable,
)
from runner.core.models import Quote
from runner.core.money import format_usd, from_nanos
from runner.ledger.db import open_database, parse_time, rows_as_dicts, time_text, utcnow
from runner.ledger.migrate import head_revision, upgrade
from runner.ledger.tx import NOW, Hold, Tx
from runner.ledger.views import RUN_COLUMNS, BudgetView, RequestRow, RunView, Settlement

OWNER_STALE_S = 30.0  # a run's owner that has not been seen for this long is taken for gone
BUDGET_COLUMNS = "id, name, limit_nanos, spent_nanos, reserved_nanos, possibly_billed_nanos"
RUN_TIMES = ("created_at", "finished_at", "seen_at")
IDS_IN_STATE = "SELECT id FROM requests WHERE run_id = ? AND state = ?"


def default_url() -> str:
    url = os.environ.get("RUNNER_DB")
    if url:
        return url
    folder = Path(platformdirs.user_data_dir("runner"))
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'ledger.db'}"


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def owner_alive(owner: str, seen_at: datetime | None, stale_after_s: float) -> bool:
    """Whether a run's owner ("host:pid", or a worker's "host:pid:tag") still runs it: seen lately,
    and, on this host, its process exists."""
    host, _, rest = owner.partition(":")
    pid = rest.split(":", 1)[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False  # it died (killed, crashed): take over at once
        except PermissionError:
            pass  # exists, under another user
    if seen_at is None:
        return False
    if seen_at.tzinfo is None:  # stored as UTC without its zone
        seen_at = seen_at.replace(tzinfo=UTC)
    return (utcnow() - seen_at).total_seconds() < stale_after_s


@functools.lru_cache(maxsize=4096)
def stored_quote(nanos: int | None, exact: bool, source: str, reason: str | None) -> Quote:
    """A quote kept in the ledger, as a Quote: a job's quotes repeat (same model, similar length),
    and a Quote is frozen, so one object serves every line with the same price."""
    amount = None if nanos is None else from_nanos(nanos)
    return Quote(amount, exact=exact, source=source, reason=reason or "", nanos=nanos)


class Ledger:
    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_url()
        self.db = open_database(self.url)
        try:
            self.migrate()
        except (sqlite3.Error, LedgerUnavailable) as exc:  # a missing folder, a file not a ledger
            reason = exc.reason if isinstance(exc, LedgerUnavailable) else str(exc)
            msg = f"the ledger {self.db.path} cannot be opened ({reason}); check --db or RUNNER_DB"
            raise ConfigError(msg) from None

    def close(self) -> None:
        self.db.close()

    def migrate(self) -> None:
        """Bring the database to the newest migration (runner.ledger.migrate)."""
        if self.revision() != head_revision():
            upgrade(self.db)

    def revision(self) -> str | None:
        """The migration the database is at; None for a blank one."""
        try:
            with self.db.reading() as c:
                row = c.execute("SELECT version_num FROM alembic_version").fetchone()
        except LedgerUnavailable as exc:
            if "no such table" in exc.reason:  # a blank database
                return None
            raise
        return None if row is None else str(row[0])

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction (BEGIN IMMEDIATE): committed when the block ends, rolled back if it
        raises."""
        with self.db.writing() as conn:
            tx = Tx(conn)
            yield tx
            tx.flush()

    def reading(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A connection in a read transaction (one snapshot for everything read through it)."""
        return self.db.reading()

    # ---- budgets --------------------------------------------------------------------------

    def create_budget(self, name: str, limit_nanos: int, *, ephemeral: bool = False) -> BudgetView:
        if limit_nanos < 0:
            msg = "a budget's limit cannot be negative"
            raise LedgerError(msg)
        with self.transaction() as tx:
            conn = tx.conn
            if conn.execute("SELECT id FROM budgets WHERE name = ?", (name,)).fetchone():
                msg = f"budget '{name}' already exists (use `runner budget raise`)"
                raise LedgerError(msg)
            (budget_id,) = conn.execute(
                "INSERT INTO budgets (name, limit_nanos, spent_nanos, reserved_nanos, possibly_billed_nanos,"
                " ephemeral, created_at) VALUES (?, ?, 0, 0, 0, ?, ?) RETURNING id",
                (name, limit_nanos, ephemeral, tx.now),
            ).fetchone()
            tx.budget_entry(int(budget_id), "create", limit_nanos)
        return self.budget(name)

    def budget(self, name: str, conn: sqlite3.Connection | None = None) -> BudgetView:
        query = f"SELECT {BUDGET_COLUMNS} FROM budgets WHERE name = ?"  # noqa: S608 - our names
        if conn is not None:
            row = conn.execute(query, (name,)).fetchone()
        else:
            with self.db.reading() as c:
                row = c.execute(query, (name,)).fetchone()
        if row is None:
            msg = f"no budget named '{name}' (create it with `runner budget create {name} --limit USD`)"
            raise BudgetNotFound(msg, budget=name)
        return BudgetView(*row)

    def budget_by_id(self, budget_id: int) -> BudgetView:
        with self.db.reading() as c:
            row = c.execute(f"SELECT {BUDGET_COLUMNS} FROM budgets WHERE id = ?", (budget_id,)).fetchone()  # noqa: S608
        if row is None:
            msg = f"no budget with id {budget_id}"
            raise LedgerError(msg)
        return BudgetView(*row)

    def budget_ephemeral(self, budget_id: int) -> bool:
        """Whether the budget was made by --max-usd for one run (not a named, shared one)."""
        with self.db.reading() as c:
            row = c.execute("SELECT ephemeral FROM budgets WHERE id = ?", (budget_id,)).fetchone()
        return bool(row and row[0])

    def budgets(self, *, include_ephemeral: bool = False) -> list[BudgetView]:
        where = "" if include_ephemeral else " WHERE NOT ephemeral"
        with self.db.reading() as c:
            rows = c.execute(f"SELECT {BUDGET_COLUMNS} FROM budgets{where} ORDER BY name").fetchall()  # noqa: S608
        return [BudgetView(*row) for row in rows]

    def set_limit(self, name: str, limit_nanos: int) -> BudgetView:
        with self.transaction() as tx:
            conn = tx.conn
            current = self.budget(name, conn)
            committed = current.spent_nanos + current.reserved_nanos + current.possibly_billed_nanos
            if limit_nanos < committed:
                msg = f"budget '{name}' cannot go below what is spent and reserved ({format_usd(committed)})"
                raise BudgetLimitTooLow(msg)
            conn.execute("UPDATE budgets SET limit_nanos = ? WHERE id = ?", (limit_nanos, current.id))
            tx.budget_entry(current.id, "raise", limit_nanos - current.limit_nanos)
        return self.budget(name)

    def history(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        budget = self.budget(name)
        query = "SELECT * FROM ledger_entries WHERE budget_id = ? ORDER BY id DESC LIMIT ?"
        with self.db.reading() as c:
            return rows_as_dicts(c.execute(query, (budget.id, limit)), times=("at",))

    # ---- money (each called inside `transaction()`; the Writer may commit several in one) ------

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

    # ---- quotes --------------------------------------------------------------------------

    def cached_quotes(self, keys: Sequence[str], *, since: datetime | None = None) -> dict[str, Quote]:
        """The kept quotes of `keys`; with `since`, only those asked at or after it."""
        found: dict[str, Quote] = {}
        young = "" if since is None else "at >= ? AND "
        sql = f"SELECT key, amount_nanos, exact, source, reason FROM quotes WHERE {young}key IN ({{}})"  # noqa: S608
        params = () if since is None else (time_text(since),)
        for key, amount, exact, source, reason in self._select_in(sql, keys, *params):
            found[key] = stored_quote(amount, bool(exact), source, reason)
        return found

    def reusable_answers(self, scope: str, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
        """{answer key: (row id, what it cost)} of answers kept from runs on this provider endpoint
        (the newest for each key); copies are not sources, their originals are."""
        sql = (
            "SELECT r.answer_key, r.id, coalesce(r.price_nanos, 0) FROM requests r"
            " JOIN runs ON runs.id = r.run_id WHERE runs.provider = ? AND r.state = 'ok'"
            " AND r.cached_from IS NULL AND r.answer_key IN ({}) ORDER BY r.id"
        )
        return {key: (int(row_id), int(price)) for key, row_id, price in self._select_in(sql, keys, scope)}

    def fill_copies(self, run_id: str) -> int:
        """Give the run's copies their answers: a copy of an earlier run's answer at once, a copy of
        an identical line once that line is answered (ok or failed). Copies cost nothing; returns
        how many were filled."""
        fields = (
            "prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens, content,"
            " reasoning_content, tool_calls, finish_reason, response_json, error_type, error_message"
        )
        copied = ", ".join(f"{f} = src.{f}" for f in fields.split(", "))
        with self.transaction() as tx:
            # an identical line of the same run: the first of them that is not a copy is the source
            tx.conn.execute(
                "UPDATE requests SET cached_from = (SELECT min(o.id) FROM requests o"
                " WHERE o.run_id = requests.run_id AND o.answer_key = requests.answer_key"
                " AND o.state != 'copy') WHERE run_id = ? AND state = 'copy' AND cached_from IS NULL",
                (run_id,),
            )
            done = tx.conn.execute(
                f"UPDATE requests SET {copied}, state = src.state, price_nanos = 0, finished_at = ?"  # noqa: S608
                " FROM requests AS src WHERE requests.run_id = ? AND requests.state = 'copy'"
                " AND src.id = requests.cached_from AND src.state IN ('ok', 'failed')",
                (tx.now, run_id),
            ).rowcount
        return int(done)

    def source_prices(self, run_id: str) -> dict[str, int]:
        """{custom_id: what the answer cost when it was bought} for the run's requests answered from
        the ledger."""
        with self.db.reading() as c:
            rows = c.execute(
                "SELECT r.custom_id, coalesce(src.price_nanos, 0) FROM requests r"
                " JOIN requests src ON src.id = r.cached_from WHERE r.run_id = ?",
                (run_id,),
            ).fetchall()
        return {str(custom_id): int(price) for custom_id, price in rows}

    def reused(self, run_id: str) -> tuple[int, int]:
        """(requests of the run answered from the ledger, what their answers cost when bought)."""
        with self.db.reading() as c:
            count, saved = c.execute(
                "SELECT count(*), coalesce(sum(src.price_nanos), 0) FROM requests r"
                " JOIN requests src ON src.id = r.cached_from WHERE r.run_id = ? AND r.state != 'copy'",
                (run_id,),
            ).fetchone()
        return int(count), int(saved)

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

    def _select_in(self, sql: str, keys: Sequence[Any], *params: Any) -> Iterator[tuple[Any, ...]]:
        """Rows of `sql`, whose `{}` is an IN list, for keys any in number (asked 500 at a time).

        Lookups run once per line of a job: one statement per 500 keys keeps the per-call cost of the
        driver below SQLite's own part of the work.
        """
        with self.db.reading() as c:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                yield from c.execute(sql.format(", ".join("?" * len(chunk))), (*params, *chunk))

    def store_quotes(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        with self.transaction() as tx:
            tx.conn.executemany(
                "INSERT INTO quotes (key, amount_nanos, exact, source, reason, at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET amount_nanos = excluded.amount_nanos,"
                " exact = excluded.exact, source = excluded.source, reason = excluded.reason,"
                " at = excluded.at",
                [(r["key"], r["amount_nanos"], r["exact"], r["source"], r["reason"], tx.now) for r in rows],
            )

    # ---- runs ----------------------------------------------------------------------------

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

    # ---- who sends a run: the workers of runner.ledger.workers; a run being prepared has an owner
    # (its preparer, "host:pid:tag") that the others wait for

    @staticmethod
    def retry_failed(tx: Tx, run_id: str) -> int:
        """A run's failed requests (they held nothing) go back to pending; their attempts stay."""
        sql = (
            "UPDATE requests SET state = 'pending', finished_at = NULL, worker_id = NULL"
            " WHERE run_id = ? AND state = ?"
        )
        return int(tx.conn.execute(sql, (run_id, "failed")).rowcount)

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

    def pending_quote_nanos(self, run_id: str) -> int:
        query = "SELECT coalesce(sum(quote_nanos), 0) FROM requests WHERE run_id = ? AND state = 'pending'"
        with self.db.reading() as c:
            return int(c.execute(query, (run_id,)).fetchone()[0])

    def possibly_billed(self, run_id: str, tx: Tx) -> list[int]:
        return [int(row[0]) for row in tx.conn.execute(IDS_IN_STATE, (run_id, "possibly_billed"))]

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


def metadata_text(metadata: dict[str, Any]) -> str | None:
    return json.dumps(metadata, ensure_ascii=False, sort_keys=True) if metadata else None


__all__ = ["BudgetView", "Ledger", "RequestRow", "Settlement"]
