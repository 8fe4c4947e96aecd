"""The ledger's SQLite connections at run time: the standard library's driver, pooled.

The schema is SQLModel's (`tables.py`) and alembic migrates it (`migrations/`); a ledger already at
the newest migration is read and written with plain SQL through `sqlite3`, so a command does not load
SQLAlchemy (two thirds of `runner run`'s start-up) unless it has a migration to run.

Writes begin with `BEGIN IMMEDIATE`, so a check and the write that depends on it cannot interleave
with another process; reads run in a deferred transaction of their own (one snapshot for all they
read). Every connection has WAL, `synchronous = NORMAL` (a killed process loses nothing committed),
a busy timeout and foreign keys on.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from runner.core.errors import ConfigError, LedgerUnavailable, printable
from runner.ledger.migrate import migration_engine

BUSY_TIMEOUT_MS = 30_000
STORED_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how the ledger writes UTC (SQLAlchemy's DateTime on SQLite)
PRAGMAS = (
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",  # WAL + NORMAL survives a killed process
    "PRAGMA foreign_keys = ON",
)


def sqlite_path(url: str) -> str:
    """The file a `sqlite:///PATH` URL names (`sqlite:////abs/path` for an absolute one). The ledger
    sets its own connection options: a URL that gives some (`?mode=ro`) is refused, not ignored."""
    prefix = "sqlite:///"
    path, _, options = url[len(prefix) :].partition("?") if url.startswith(prefix) else ("", "", "")
    if options:
        msg = (
            f"the ledger URL gives SQLite options ('?{printable(options)}'), which runner does not take: "
            "it sets its own; give sqlite:///PATH alone"
        )
        raise ConfigError(msg)
    if not path or path == ":memory:":
        scheme = url.split(":", 1)[0] if ":" in url else url  # never the rest: it may hold a password
        msg = (
            "the ledger must be a SQLite file (sqlite:///PATH) or a PostgreSQL database "
            f"(postgresql://USER:PASSWORD@HOST:PORT/DB); got a {scheme!r} URL"
        )
        raise ConfigError(msg)
    return path


class Cursor(Protocol):
    """What the ledger reads of a statement's result (sqlite3's and psycopg's cursors both are)."""

    @property
    def rowcount(self) -> int: ...
    @property
    def description(self) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The calls the ledger makes on a connection: sqlite3's, and pg.Connection (psycopg's, with
    SQLite's placeholders translated)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...
    def executemany(self, sql: str, parameters: Any, /) -> Cursor: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


class Database(Protocol):
    """One ledger database: SQLite (`SqliteDatabase`) or PostgreSQL (`pg.PgDatabase`)."""

    path: str  # what messages name (a file, or a URL without its password)
    dialect: str
    clock_sql: str  # the database's clock, in epoch seconds: one clock for every host
    skip_locked: str  # appended to a claim's SELECT where rows can be locked by another writer

    def gone(self) -> str | None: ...
    def save_copy(self, fallback: str) -> str: ...
    def backup(self, target: str) -> None: ...
    def damage(self) -> str | None: ...
    def migration_engine(self) -> Any: ...
    def reading(self) -> AbstractContextManager[Connection]: ...
    def writing(self) -> AbstractContextManager[Connection]: ...
    def close(self) -> None: ...


def open_database(url: str, *, read_only: bool = False) -> Database:
    """The ledger's connections for a URL: a SQLite file, or a PostgreSQL database (psycopg, loaded
    only for one). `read_only`: a SQLite file opened only to be read (one on a read-only mount, or
    that this user may not write)."""
    if url.startswith(("postgresql://", "postgres://")):
        from runner.ledger.pg import PgDatabase  # noqa: PLC0415 - SQLite users do not load psycopg

        return PgDatabase(url)
    return SqliteDatabase(sqlite_path(url), read_only=read_only)


# what the driver raises for a mistake in runner's own SQL or data, not for the file: a defect to see
DEFECTS = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    sqlite3.NotSupportedError,
)


class SqliteDatabase:
    """Connections to one SQLite file, each used by one thread at a time and then kept for the next."""

    dialect = "sqlite"
    # the ledger's clock, in epoch seconds: the same clock for every process that uses the ledger
    clock_sql = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    skip_locked = ""  # SQLite's writer holds the whole database: no row is ever locked by another

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file first opened
        weakref.finalize(self, _close_all, self._idle)  # a ledger dropped unclosed closes its files

    def gone(self) -> str | None:
        """Whether the file opened is no longer at its path: 'deleted', 'replaced' or None."""
        if self._identity is None:
            return None
        try:
            found = Path(self.path).stat()
        except FileNotFoundError:
            return "deleted"
        except OSError:
            return None  # cannot tell: the connections will say if they cannot work
        return None if (found.st_dev, found.st_ino) == self._identity else "replaced"

    def save_copy(self, fallback: str) -> str:
        """Copy what the open connections see (a consistent snapshot) to the ledger's path when the
        file there was deleted, else to `fallback`; the connections are closed (the next ones open
        the file at the path). Returns where the copy is."""
        staging = f"{fallback}.part"
        self._snapshot(staging)
        self.close()  # the last connection of the deleted file ends its WAL files at the path
        where = self.path if not Path(self.path).exists() else fallback
        Path(staging).replace(where)
        self._identity = None
        return where

    def backup(self, target: str) -> None:
        """A consistent copy of the ledger at `target` (SQLite's online backup: other processes may
        write meanwhile), written beside it first and moved into place once whole."""
        staging = f"{target}.part"
        self._snapshot(staging)
        Path(staging).replace(target)

    def _snapshot(self, path: str) -> None:
        """A consistent copy of what a connection sees, written to `path` (SQLite's backup API)."""
        with self._connection() as source:
            copy = sqlite3.connect(path)
            try:
                source.backup(copy)
            finally:
                copy.close()

    def damage(self) -> str | None:
        """What SQLite's quick integrity check finds wrong with the file; None when nothing is."""
        try:
            with self.reading() as conn:
                found = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
        except LedgerUnavailable as exc:
            return exc.reason
        return None if found == ["ok"] else "; ".join(found)

    def migration_engine(self) -> Any:
        """SQLAlchemy's engine on this file, for alembic."""
        return migration_engine(f"sqlite:///{self.path}", PRAGMAS)

    def _open(self) -> sqlite3.Connection:
        if self.read_only:
            conn = _open_read_only(self.path)
        else:
            # isolation_level=None: the driver issues no BEGIN of its own; the transactions are ours
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            try:
                for pragma in PRAGMAS:
                    conn.execute(pragma)
            except sqlite3.Error:  # a damaged file shows as soon as a pragma reads it
                conn.close()
                raise
        if self._identity is None:
            found = Path(self.path).stat()
            self._identity = (found.st_dev, found.st_ino)
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            try:
                conn = self._open()
            except sqlite3.DatabaseError as exc:  # a file damaged under a run: its reason, as any write's
                if isinstance(exc, DEFECTS):
                    raise
                raise unavailable(self.path, exc) from None
        try:
            yield conn
        except BaseException as exc:
            try:
                conn.rollback()
            except sqlite3.Error:  # a damaged file, a full disk: this connection is not kept
                conn.close()
            else:
                self._keep(conn)
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, DEFECTS):
                raise unavailable(self.path, exc) from None
            raise
        self._keep(conn)

    def _keep(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.rollback()
        with self._lock:
            self._idle.append(conn)

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A connection in a read transaction, rolled back at the end."""
        with self._connection() as conn:
            conn.execute("BEGIN")
            yield conn

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """A connection in a write transaction (BEGIN IMMEDIATE), committed at the end unless the
        block raised."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            idle = self._idle[:]
            self._idle.clear()
        _close_all(idle)


def _open_read_only(path: str) -> sqlite3.Connection:
    """A connection that only reads the file: SQLite's read-only mode, and where the folder cannot
    take the WAL's shared-memory file either (a read-only mount), the file taken as immutable."""
    uri = Path(path).resolve().as_uri()
    last: sqlite3.Error | None = None
    for options in ("mode=ro", "mode=ro&immutable=1"):
        conn = sqlite3.connect(
            f"{uri}?{options}",
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            conn.close()
            last = exc
            continue
        conn.execute(PRAGMAS[0])  # the busy timeout: a writer elsewhere may hold the file a moment
        return conn
    assert last is not None
    raise last


def unavailable(path: str, exc: sqlite3.Error) -> LedgerUnavailable:
    """What the driver said of the file, as a message that says what to do."""
    reason = str(exc)
    if "full" in reason:
        advice = "free some space, then run the same command again: the run resumes where it stopped"
    elif "malformed" in reason or "not a database" in reason:
        advice = (
            "the file is damaged (it is left as it is): restore it from a backup and run the same "
            "command again, or point --db / RUNNER_DB at another file"
        )
    elif "readonly" in reason or "read-only" in reason:
        advice = (
            "the file or its folder cannot be written: fix its permissions, then run the same command again"
        )
    else:
        advice = "once it can be used again, run the same command again: the run resumes where it stopped"
    msg = f"the ledger {path} cannot be used ({reason}); {advice}"
    return LedgerUnavailable(msg, path=path, reason=reason)


def _close_all(connections: list[sqlite3.Connection]) -> None:
    for conn in connections:
        conn.close()


def rows_as_dicts(cursor: Cursor, times: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A cursor's rows as dicts by column name, the named timestamp columns read as datetimes."""
    names = [column[0] for column in cursor.description]
    rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        for name in times:
            if name in row:
                row[name] = parse_time(row[name])
    return rows


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_time(text: str | None) -> datetime | None:
    """A stored timestamp (UTC, written without its zone) as an aware datetime."""
    if text is None:
        return None
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def time_text(moment: datetime) -> str:
    """A datetime in the ledger's stored form (UTC, no zone)."""
    return moment.astimezone(UTC).strftime(STORED_TIME)


__all__ = ["Database", "open_database", "parse_time", "rows_as_dicts", "sqlite_path", "time_text", "utcnow"]
