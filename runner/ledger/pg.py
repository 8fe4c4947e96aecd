"""The ledger on PostgreSQL (psycopg 3): the same store and SQL as on SQLite, behind the same seam.

The store's SQL is written once, with `?` placeholders (SQLite's); the connections here take it as it
is (`?` becomes `%s`) and give back what SQLite would: timestamps as the ledger's stored text, booleans
as 0 / 1. Write transactions take one transaction-level advisory lock first, so writers follow each
other as they do under SQLite's `BEGIN IMMEDIATE`: a check and the write that depends on it cannot
interleave with another process's, on any machine. Reads run in a REPEATABLE READ snapshot.

The URL's password never leaves this module: messages name the ledger by its URL without it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import psycopg
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict

from runner.core.errors import ConfigError, LedgerUnavailable

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

LEDGER_LOCK = 0x72756E6E6572  # "runner": the advisory lock every write transaction of the ledger takes
CONNECT_TIMEOUT_S = 10


class _TimeText(Loader):
    """A timestamp as the ledger's stored text (`YYYY-MM-DD HH:MM:SS.ffffff`), as SQLite keeps it."""

    def load(self, data: Any) -> str:
        text = bytes(data).decode()
        if text.endswith("+00"):  # a timestamptz, read in the session's zone: UTC
            text = text[:-3]
        return text if "." in text else f"{text}.000000"


class _BoolInt(Loader):
    """A boolean as 0 / 1, as SQLite keeps it."""

    def load(self, data: Any) -> int:
        return 1 if bytes(data) == b"t" else 0


def redacted(url: str) -> str:
    """The URL without its password (or any other secret in its query)."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "a postgresql:// URL that cannot be read"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class Connection:
    """A psycopg connection that takes the store's SQL (`?` placeholders) and answers as sqlite3's."""

    _sql: ClassVar[dict[str, str]] = {}  # the store's statements, translated once each

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    @classmethod
    def _translate(cls, sql: str) -> str:
        found = cls._sql.get(sql)
        if found is None:
            found = cls._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return found

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        # psycopg prepares a statement on the server once it has run a few times: the ledger runs
        # the same few statements for every request (benchmarks/workers.py, one worker: run phase
        # 0.68 x the bare loop with every statement parsed and planned again, 0.83 x prepared)
        return self.raw.execute(self._translate(sql), tuple(params) or None)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> psycopg.Cursor[Any]:
        cursor = self.raw.cursor()
        cursor.executemany(self._translate(sql), [tuple(r) for r in rows])
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def rollback(self) -> None:
        self.raw.rollback()

    def close(self) -> None:
        self.raw.close()


class PgDatabase:
    """Pooled connections to one PostgreSQL database; meeting the `db.Database` protocol."""

    dialect = "postgresql"
    clock_sql = "SELECT extract(epoch FROM clock_timestamp())::float8"  # the server's clock, not a host's
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = redacted(url)  # how messages name the ledger
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        weakref.finalize(self, _close_all, self._idle)  # a ledger dropped unclosed closes its connections

    def gone(self) -> str | None:
        return None  # a server's database does not vanish from under an open connection unseen

    def backup(self, target: str) -> None:
        msg = f"a PostgreSQL ledger ({self.path}) is backed up with PostgreSQL's own tools (pg_dump)"
        raise ConfigError(msg)

    def damage(self) -> str | None:
        return None  # the server checks its own pages (data checksums); nothing for a client to scan

    def save_copy(self, fallback: str) -> str:  # pragma: no cover - only for a SQLite file gone
        raise LedgerUnavailable(f"the ledger {self.path} cannot be copied", path=self.path, reason="")

    def migration_engine(self) -> Engine:
        """SQLAlchemy's engine for alembic, on psycopg; one process migrates at a time (the lock)."""
        from sqlalchemy import create_engine, event  # noqa: PLC0415 - loaded only to migrate

        _, _, rest = self.url.partition("://")
        engine = create_engine(f"postgresql+psycopg://{rest}")

        @event.listens_for(engine, "begin")
        def _lock(conn: Any) -> None:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({LEDGER_LOCK})")

        return engine

    def _open(self) -> Connection:
        try:
            # the ledger writes UTC without its zone: the session reads and writes in UTC
            conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, options="-c TimeZone=UTC"
            )
        except psycopg.Error as exc:
            raise self.unavailable(exc) from None
        for name in ("timestamp", "timestamptz"):
            conn.adapters.register_loader(name, _TimeText)
        conn.adapters.register_loader("bool", _BoolInt)
        return Connection(conn)

    def unavailable(self, exc: psycopg.Error) -> LedgerUnavailable:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        password = conninfo_to_dict(self.url).get("password")
        if password:
            reason = reason.replace(str(password), "***")
        msg = (
            f"the ledger {self.path} cannot be used ({reason}); once the server can be reached, run the "
            "same command again: the run resumes where it stopped"
        )
        return LedgerUnavailable(msg, path=self.path, reason=reason)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
        try:
            yield conn
        except BaseException as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except psycopg.Error:
                conn.close()
            else:
                self._keep(conn)
            if isinstance(exc, psycopg.OperationalError):
                raise self.unavailable(exc) from None
            if isinstance(exc, psycopg.errors.UndefinedTable):  # as SQLite words it: a blank database
                reason = f"no such table ({str(exc).splitlines()[0]})"
                raise LedgerUnavailable(reason, path=self.path, reason=reason) from None
            raise
        self._keep(conn)

    def _keep(self, conn: Connection) -> None:
        if conn.raw.closed:
            return
        with self._lock:
            self._idle.append(conn)

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        with self._connection() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield conn
            finally:
                conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def writing(self) -> Iterator[Connection]:
        with self._connection() as conn:
            conn.execute("BEGIN")
            conn.execute(f"SELECT pg_advisory_xact_lock({LEDGER_LOCK})")
            yield conn
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            idle = self._idle[:]
            self._idle.clear()
        _close_all(idle)


def _close_all(connections: list[Connection]) -> None:
    for conn in connections:
        conn.close()
