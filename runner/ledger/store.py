"""The Ledger: open + migrate, budgets, reservations, settlements, runs and quotes (synchronous).

Every write goes through `transaction()`, which on SQLite starts with BEGIN IMMEDIATE, so a check and
the write that depends on it cannot interleave with another process. Async code reaches the ledger
through `runner.ledger.writer.Writer`, which groups writes into one commit per batch in a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import platformdirs
from sqlalchemy import Connection, Engine, create_engine, event, func, select, update
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import ConnectionPoolEntry

from runner.errors import BudgetLimitTooLow, BudgetNotFound, LedgerError, RunBusy
from runner.ledger.tables import Budget, LedgerEntry, QuoteCache, Request, Run, utcnow
from runner.ledger.tx import NOW, Hold, Tx
from runner.money import format_usd

try:
    import fcntl
except ImportError:  # Windows has no fcntl: SQLite's locking alone
    fcntl = None  # type: ignore[assignment]

BUSY_TIMEOUT_MS = 30_000
OWNER_STALE_S = 30.0  # a run's owner that has not been seen for this long is taken for gone
B = Budget.__table__  # type: ignore[attr-defined]
E = LedgerEntry.__table__  # type: ignore[attr-defined]
RQ = Request.__table__  # type: ignore[attr-defined]
RN = Run.__table__  # type: ignore[attr-defined]
Q = QuoteCache.__table__  # type: ignore[attr-defined]


def default_url() -> str:
    url = os.environ.get("RUNNER_DB")
    if url:
        return url
    folder = Path(platformdirs.user_data_dir("runner"))
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'ledger.db'}"


def migrations_dir() -> Path:
    packaged = Path(__file__).resolve().parent.parent / "_migrations"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "migrations"


def head_revision() -> str:
    """The newest migration's revision: revisions are the numbers their files are named by, in order."""
    return max(path.name.split("_", 1)[0] for path in (migrations_dir() / "versions").glob("[0-9]*_*.py"))


class _WriteTurns:
    """Writers of one SQLite file take turns through a lock on a file beside it (`<ledger>-lock`).

    SQLite alone makes a writer that finds the file locked sleep and try again (1 ms, then 2, 5,
    10 ...), so processes committing hundreds of times a second each (`runner run --processes`,
    several runners on one budget) would spend their time asleep. Waiting on flock instead, the
    next writer is woken the moment the last one commits. The kernel drops the lock of a process
    that dies. SQLite's own locking still guards the file (and other programs' writes).
    """

    def __init__(self, engine: Engine) -> None:
        name = engine.url.database if engine.dialect.name == "sqlite" else None
        self.path = f"{name}-lock" if name and name != ":memory:" and fcntl is not None else None
        self._local = threading.local()  # a descriptor per thread: flock excludes descriptors
        self._fds: list[int] = []
        weakref.finalize(self, _close_all, self._fds)

    def __enter__(self) -> None:
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1
        if local.depth > 1 or self.path is None:  # held already by this thread, or no lock file
            return
        fd = getattr(local, "fd", None)
        if fd is None:
            try:
                fd = local.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                self._fds.append(fd)
            except OSError:  # a folder we cannot write: SQLite's locking alone
                self.path = None
                return
        fcntl.flock(fd, fcntl.LOCK_EX)
        local.locked = True

    def __exit__(self, *exc: object) -> None:
        local = self._local
        local.depth -= 1
        if local.depth == 0 and getattr(local, "locked", False):  # whatever became of self.path
            fcntl.flock(local.fd, fcntl.LOCK_UN)
            local.locked = False


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def make_engine(url: str, *, immediate: bool) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL survives a killed process
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def this_process() -> str:
    """How a run's owner is named: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str, seen_at: datetime | None, stale_after_s: float) -> bool:
    """Whether a run's owner still runs it: seen lately, and, on this host, its process exists."""
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False  # it died (killed, crashed): take over at once
        except PermissionError:
            pass  # exists, under another user
    if seen_at is None:
        return False
    if seen_at.tzinfo is None:  # SQLite keeps UTC without its zone
        seen_at = seen_at.replace(tzinfo=UTC)
    return (utcnow() - seen_at).total_seconds() < stale_after_s


@dataclass(frozen=True, slots=True)
class BudgetView:
    id: int
    name: str
    limit_nanos: int
    spent_nanos: int
    reserved_nanos: int
    possibly_billed_nanos: int

    @property
    def remaining_nanos(self) -> int:
        return self.limit_nanos - self.spent_nanos - self.reserved_nanos - self.possibly_billed_nanos


class RequestRow(NamedTuple):
    id: int
    custom_id: str
    sha256: str
    state: str
    quote_nanos: int | None
    attempts: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of one request, written in the transaction that turns its reservation into a charge."""

    request_id: int
    price_nanos: int
    fields: dict[str, Any]
    hold: Hold | None = None  # what the request holds, when the caller knows (saves a read)


class Ledger:
    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_url()
        self.engine = make_engine(self.url, immediate=True)
        self.reader = make_engine(self.url, immediate=False)
        self._turns = _WriteTurns(self.engine)
        self.migrate()

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()

    def migrate(self) -> None:
        """Bring the database to the newest migration. A database already there is not handed to
        alembic at all: importing it costs a fifth of a second on every command."""
        if self.revision() == head_revision():
            return
        from alembic import command  # noqa: PLC0415 - imported only when there is work for it
        from alembic.config import Config  # noqa: PLC0415

        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        with self.engine.begin() as conn:  # BEGIN IMMEDIATE: one process migrates at a time
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def revision(self) -> str | None:
        """The migration the database is at; None for a blank one."""
        try:
            with self.reader.connect() as c:
                return c.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one_or_none()
        except DBAPIError:  # no alembic_version table yet
            return None

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction (BEGIN IMMEDIATE on SQLite); what it buffered is written at the end."""
        with self._turns, self.engine.begin() as conn:
            tx = Tx(conn)
            yield tx
            tx.flush()

    # ---- budgets --------------------------------------------------------------------------

    def create_budget(self, name: str, limit_nanos: int, *, ephemeral: bool = False) -> BudgetView:
        if limit_nanos < 0:
            msg = "a budget's limit cannot be negative"
            raise LedgerError(msg)
        with self.transaction() as tx:
            conn = tx.conn
            if conn.execute(select(B.c.id).where(B.c.name == name)).first():
                msg = f"budget '{name}' already exists (use `runner budget raise`)"
                raise LedgerError(msg)
            row = {
                "name": name,
                "limit_nanos": limit_nanos,
                "ephemeral": ephemeral,
                "created_at": utcnow(),
            }
            budget_id = conn.execute(B.insert().values(**row)).inserted_primary_key[0]  # type: ignore[index]
            tx.budget_entry(budget_id, "create", limit_nanos)
        return self.budget(name)

    def budget(self, name: str, conn: Connection | None = None) -> BudgetView:
        query = select(B).where(B.c.name == name)
        if conn is not None:
            row = conn.execute(query).first()
        else:
            with self.reader.connect() as c:
                row = c.execute(query).first()
        if row is None:
            msg = f"no budget named '{name}' (create it with `runner budget create {name} --limit USD`)"
            raise BudgetNotFound(msg, budget=name)
        return _budget_view(row)

    def budget_by_id(self, budget_id: int) -> BudgetView:
        with self.reader.connect() as c:
            row = c.execute(select(B).where(B.c.id == budget_id)).one()
        return _budget_view(row)

    def budgets(self, *, include_ephemeral: bool = False) -> list[BudgetView]:
        query = select(B).order_by(B.c.name)
        if not include_ephemeral:
            query = query.where(B.c.ephemeral.is_(False))
        with self.reader.connect() as c:
            return [_budget_view(row) for row in c.execute(query)]

    def set_limit(self, name: str, limit_nanos: int) -> BudgetView:
        with self.transaction() as tx:
            conn = tx.conn
            current = self.budget(name, conn)
            committed = current.spent_nanos + current.reserved_nanos + current.possibly_billed_nanos
            if limit_nanos < committed:
                msg = f"budget '{name}' cannot go below what is spent and reserved ({format_usd(committed)})"
                raise BudgetLimitTooLow(msg)
            conn.execute(update(B).where(B.c.id == current.id).values(limit_nanos=limit_nanos))
            tx.budget_entry(current.id, "raise", limit_nanos - current.limit_nanos)
        return self.budget(name)

    def history(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        budget = self.budget(name)
        query = select(E).where(E.c.budget_id == budget.id).order_by(E.c.id.desc()).limit(limit)
        with self.reader.connect() as c:
            return [dict(row._mapping) for row in c.execute(query)]

    # ---- money (call inside `transaction()`; the Writer groups many into one) ---------------
    # These only touch the Tx buffer: totals read once per budget, rows written by executemany at
    # the commit (runner/ledger/tx.py, benchmarks/ledger.py).

    @staticmethod
    def reserve(tx: Tx, budget_id: int, run_id: str, request_id: int, amount: int) -> bool:
        """Hold `amount`: granted only if spent + reserved + possibly billed + amount <= limit."""
        totals = tx.totals(budget_id)
        if not totals.fits(amount):
            return False
        totals.reserved += amount
        hold = Hold(amount, budget_id, run_id)
        tx.set_hold(request_id, hold)
        tx.update_request(request_id, {"state": "reserved"})
        tx.entry("reserve", amount, hold, request_id)
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
        totals = tx.totals(hold.budget_id)
        totals.reserved -= hold.amount
        totals.spent += price
        tx.update_request(request_id, {"state": "ok", "price_nanos": price, "finished_at": NOW})
        tx.update_request(request_id, settlement.fields)
        tx.set_hold(request_id, Hold(0, hold.budget_id, hold.run_id))
        tx.entry("settle", price, hold, request_id)
        if hold.amount > price:
            tx.entry("release", hold.amount - price, hold, request_id)

    @staticmethod
    def release(tx: Tx, request_id: int, *, state: str, fields: dict[str, Any]) -> None:
        """Give back an unused reservation (the request failed before anything was billed)."""
        hold = tx.hold(request_id)
        tx.totals(hold.budget_id).reserved -= hold.amount
        tx.update_request(request_id, {"state": state, "finished_at": NOW, **fields})
        tx.set_hold(request_id, Hold(0, hold.budget_id, hold.run_id))
        if hold.amount:
            tx.entry("release", hold.amount, hold, request_id)

    @staticmethod
    def mark_possibly_billed(tx: Tx, request_id: int, fields: dict[str, Any]) -> None:
        """An unknown outcome: the reservation stays counted, as possibly billed."""
        hold = tx.hold(request_id)
        totals = tx.totals(hold.budget_id)
        totals.reserved -= hold.amount
        totals.possibly_billed += hold.amount
        tx.update_request(request_id, {"state": "possibly_billed", "finished_at": NOW, **fields})
        tx.entry("possibly_billed", hold.amount, hold, request_id)

    @staticmethod
    def forgive_possibly_billed(tx: Tx, request_id: int) -> None:
        """The user chose to re-send: the possibly-billed hold becomes an ordinary reservation."""
        hold = tx.hold(request_id)
        totals = tx.totals(hold.budget_id)
        totals.possibly_billed -= hold.amount
        totals.reserved += hold.amount
        tx.update_request(request_id, {"state": "reserved"})
        tx.entry("reserve", hold.amount, hold, request_id)

    # ---- quotes --------------------------------------------------------------------------

    def cached_quotes(self, keys: Sequence[str]) -> dict[str, tuple[int | None, bool, str, str | None]]:
        found: dict[str, tuple[int | None, bool, str, str | None]] = {}
        sql = "SELECT key, amount_nanos, exact, source, reason FROM quotes WHERE key IN ({})"
        for key, amount, exact, source, reason in self._select_in(sql, keys):
            found[key] = (amount, bool(exact), source, reason)
        return found

    def _select_in(self, sql: str, keys: Sequence[Any], *params: Any) -> Iterator[tuple[Any, ...]]:
        """Rows of `sql`, whose `{}` is an IN list, for keys any in number (asked 500 at a time).

        Through the driver: lookups run once per line of a job, and building SQLAlchemy statements
        with hundreds of parameters cost more than SQLite's part of the work.
        """
        with self.reader.connect() as c:
            cursor = c.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                yield from cursor.execute(sql.format(", ".join("?" * len(chunk))), (*params, *chunk))

    def store_quotes(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        with self.transaction() as tx:
            keys = [r["key"] for r in rows]
            tx.conn.execute(Q.delete().where(Q.c.key.in_(keys)))
            tx.conn.execute(Q.insert(), [{**r, "at": utcnow()} for r in rows])

    # ---- runs ----------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        job_path: str,
        budget_id: int,
        provider: str,
        owner: str | None = None,
        state: str = "running",
    ) -> None:
        with self.transaction() as tx:
            now = utcnow()
            tx.conn.execute(
                RN.insert().values(
                    id=run_id,
                    job_path=job_path,
                    budget_id=budget_id,
                    provider=provider,
                    state=state,
                    total=0,
                    created_at=now,
                    owner=owner,
                    seen_at=now if owner else None,
                )
            )

    def add_requests(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            names = list(rows[0])  # the keys of every row, in one order
            # a custom_id already in the run is left as it is: each line's hash is checked before it is sent
            sql = (
                f"INSERT INTO requests ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608 - our names
                " ON CONFLICT (run_id, custom_id) DO NOTHING"
            )
            with self.transaction() as tx:
                tx.conn.exec_driver_sql(sql, [tuple(row[n] for n in names) for row in rows])

    def set_total(self, run_id: str, total: int) -> None:
        """Every line has its row: the run is complete, and ready to send."""
        with self.transaction() as tx:
            tx.conn.execute(update(RN).where(RN.c.id == run_id).values(total=total, state="running"))

    def discard_run(self, run_id: str) -> None:
        """Remove a run that never sent anything (refused by its budget, or left while preparing)."""
        with self.transaction() as tx:
            held = tx.conn.exec_driver_sql(
                "SELECT count(*) FROM requests WHERE run_id = ? AND state NOT IN ('pending', 'skipped')",
                (run_id,),
            ).scalar_one()
            if held:
                msg = f"run {run_id} has sent requests: it is kept"
                raise LedgerError(msg)
            tx.conn.exec_driver_sql("DELETE FROM requests WHERE run_id = ?", (run_id,))
            tx.conn.exec_driver_sql("DELETE FROM runs WHERE id = ?", (run_id,))

    def finish_run(self, run_id: str, state: str, reason: str | None = None) -> None:
        with self.transaction() as tx:
            tx.conn.execute(
                update(RN)
                .where(RN.c.id == run_id)
                .values(state=state, reason=reason, finished_at=utcnow(), owner=None)
            )

    # ---- who runs a run: one process at a time ---------------------------------------------
    # Two processes resuming the same run would send its pending requests twice, and each would
    # take the other's requests in flight for a crash's. A run has an owner ("host:pid") that says
    # it is alive every few seconds; another process takes it over only once the owner is gone.

    def claim_run(self, run_id: str, owner: str, *, stale_after_s: float = OWNER_STALE_S) -> None:
        """Make `owner` the run's owner, unless another live process runs it (RunBusy)."""
        with self.transaction() as tx:
            query = select(RN.c.owner, RN.c.seen_at).where(RN.c.id == run_id)
            current, seen_at = tx.conn.execute(query).one()
            if current and current != owner and owner_alive(current, seen_at, stale_after_s):
                msg = (
                    f"run {run_id} is being run by another process ({current}); wait for it to finish "
                    "(or stop it), or start a fresh run with --new"
                )
                raise RunBusy(msg, owner=current)
            tx.conn.execute(update(RN).where(RN.c.id == run_id).values(owner=owner, seen_at=utcnow()))

    @staticmethod
    def touch_run(tx: Tx, run_id: str, owner: str) -> bool:
        """The owner's sign of life; False when the run has another owner now (it was taken over)."""
        result = tx.conn.exec_driver_sql(
            "UPDATE runs SET seen_at = ? WHERE id = ? AND owner = ?", (tx.now, run_id, owner)
        )
        return bool(result.rowcount)

    def latest_run(self, job_path: str, provider: str) -> str | None:
        """The job's newest run on this provider: resumed by default (a finished one sends nothing)."""
        query = (
            select(RN.c.id)
            .where(RN.c.job_path == job_path, RN.c.provider == provider)
            .order_by(RN.c.created_at.desc())
        )
        with self.reader.connect() as c:
            row = c.execute(query).first()
        return None if row is None else str(row[0])

    def run(self, run_id: str) -> dict[str, Any]:
        with self.reader.connect() as c:
            row = c.execute(select(RN).where(RN.c.id.startswith(run_id))).first()
            if row is None:
                msg = f"no run '{run_id}' (see `runner runs`)"
                raise LedgerError(msg)
            run = dict(row._mapping)
            counts = c.execute(
                select(RQ.c.state, func.count(), func.coalesce(func.sum(RQ.c.price_nanos), 0))
                .where(RQ.c.run_id == run["id"])
                .group_by(RQ.c.state)
            ).all()
        run["states"] = {state: int(n) for state, n, _ in counts}
        run["spent_nanos"] = sum(int(s) for _, _, s in counts)
        return run

    def runs(self) -> list[dict[str, Any]]:
        with self.reader.connect() as c:
            ids = [row[0] for row in c.execute(select(RN.c.id).order_by(RN.c.created_at.desc()))]
        return [self.run(run_id) for run_id in ids]

    def request_rows(self, run_id: str, custom_ids: Sequence[str]) -> dict[str, RequestRow]:
        """What the ledger holds for these lines of a run, by custom_id."""
        sql = (
            "SELECT id, custom_id, sha256, state, quote_nanos, attempts FROM requests"
            " WHERE run_id = ? AND custom_id IN ({})"
        )
        return {row[1]: RequestRow(*row) for row in self._select_in(sql, custom_ids, run_id)}

    def interrupted_sends(self, run_id: str) -> list[int]:
        """Requests a killed process left as `sending`: their outcome is unknown."""
        with self.reader.connect() as c:
            query = select(RQ.c.id).where(RQ.c.run_id == run_id, RQ.c.state == "sending")
            return [int(row[0]) for row in c.execute(query)]

    def stale_reservations(self, run_id: str) -> list[int]:
        """Reserved but never sent by a process that died: safe to release."""
        with self.reader.connect() as c:
            query = select(RQ.c.id).where(RQ.c.run_id == run_id, RQ.c.state == "reserved")
            return [int(row[0]) for row in c.execute(query)]

    def pending_quote_nanos(self, run_id: str) -> int:
        with self.reader.connect() as c:
            query = select(func.coalesce(func.sum(RQ.c.quote_nanos), 0)).where(
                RQ.c.run_id == run_id, RQ.c.state == "pending"
            )
            return int(c.execute(query).scalar_one())

    def possibly_billed(self, run_id: str, tx: Tx) -> list[int]:
        query = select(RQ.c.id).where(RQ.c.run_id == run_id, RQ.c.state == "possibly_billed")
        return [int(row[0]) for row in tx.conn.execute(query)]

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
        with self.reader.connect() as c:
            cursor = c.connection.driver_connection.cursor()  # type: ignore[union-attr]
            while True:
                rows = cursor.execute(sql, (run_id, last, batch)).fetchall()
                if not rows:
                    return
                last = rows[-1][at]
                yield [row[1:] for row in rows] if extra else rows

    def iter_request_rows(self, run_id: str, batch: int = 5000) -> Iterator[list[dict[str, Any]]]:
        """All request rows of a run, in line order, a batch at a time (memory stays flat)."""
        last = -1
        with self.reader.connect() as c:
            while True:
                rows = c.execute(
                    select(RQ).where(RQ.c.run_id == run_id, RQ.c.line > last).order_by(RQ.c.line).limit(batch)
                ).all()
                if not rows:
                    return
                yield [dict(r._mapping) for r in rows]
                last = rows[-1].line


def _budget_view(row: Any) -> BudgetView:
    return BudgetView(
        id=row.id,
        name=row.name,
        limit_nanos=row.limit_nanos,
        spent_nanos=row.spent_nanos,
        reserved_nanos=row.reserved_nanos,
        possibly_billed_nanos=row.possibly_billed_nanos,
    )


def metadata_text(metadata: dict[str, Any]) -> str | None:
    return json.dumps(metadata, ensure_ascii=False, sort_keys=True) if metadata else None


__all__ = ["BudgetView", "Ledger", "RequestRow", "Settlement"]
