"""The ledger's core: opening (and migrating) the database, transactions, and reads in bulk.

Every write goes through `transaction()`, which starts with BEGIN IMMEDIATE (on PostgreSQL, the
ledger's advisory lock), so a check and the write that depends on it cannot interleave with another
process."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import platformdirs

from runner.core.errors import (
    ConfigError,
    LedgerUnavailable,
)
from runner.core.models import Quote
from runner.core.money import from_nanos
from runner.ledger.db import Connection, Database, open_database, sqlite_path, unavailable, utcnow
from runner.ledger.migrate import head_revision, upgrade
from runner.ledger.tx import Tx

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


def metadata_text(metadata: dict[str, Any]) -> str | None:
    return json.dumps(metadata, ensure_ascii=False, sort_keys=True) if metadata else None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class LedgerBase:
    db: Database

    def __init__(self, url: str | None = None, *, read_only: bool = False) -> None:
        self.url = url or default_url()
        self.db = open_database(self.url, read_only=read_only)
        try:
            if read_only:
                self._check_revision()
            else:
                self.migrate()
        except (sqlite3.Error, LedgerUnavailable) as exc:
            reason = exc.reason if isinstance(exc, LedgerUnavailable) else str(exc)
            # a SQLite file damaged, read-only or full: what to do (exit 4); a URL that names no
            # folder, or a PostgreSQL server that cannot be reached: check the URL (exit 2)
            if self.db.dialect == "sqlite" and "unable to open" not in reason:
                raise exc if isinstance(exc, LedgerUnavailable) else unavailable(self.db.path, exc) from None
            if self.db.dialect == "sqlite" and Path(self.db.path).is_file():  # there, but not writable
                raise _not_writable(self.db.path, reason) from None
            msg = f"the ledger {self.db.path} cannot be opened ({reason}); check --db or RUNNER_DB"
            raise ConfigError(msg) from None

    def backup(self, target: str) -> None:
        """A consistent copy of the ledger (SQLite; a PostgreSQL ledger uses pg_dump)."""
        self.db.backup(target)

    def damage(self) -> str | None:
        """What an integrity check finds wrong with the ledger's file; None when nothing is."""
        return self.db.damage()

    def close(self) -> None:
        self.db.close()

    @classmethod
    def for_reading(cls, url: str | None = None) -> Self:
        """The ledger for a command that only reads it: opened as usual, or, when its file cannot be
        written (a read-only mount, another user's file), opened to be read only."""
        url = url or default_url()
        try:
            return cls(url)
        except (LedgerUnavailable, ConfigError) as exc:
            if not url.startswith("sqlite") or not Path(sqlite_path(url)).is_file():
                raise
            try:
                return cls(url, read_only=True)
            except (LedgerUnavailable, ConfigError, sqlite3.Error):
                raise exc from None

    def _check_revision(self) -> None:
        """A ledger opened to be read must be at the newest migration: it cannot be migrated."""
        if self.revision() != head_revision():
            msg = (
                f"the ledger {self.db.path} can only be read here, and it was made by another version of "
                "runner: open it once where it can be written (it migrates itself), then read it here"
            )
            raise LedgerUnavailable(msg, path=self.db.path, reason="read-only, not migrated")

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

    def reading(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection in a read transaction (one snapshot for everything read through it)."""
        return self.db.reading()

    def _select_in(self, sql: str, keys: Sequence[Any], *params: Any) -> Iterator[tuple[Any, ...]]:
        """Rows of `sql`, whose `{}` is an IN list, for keys any in number (asked 500 at a time).

        Lookups run once per line of a job: one statement per 500 keys keeps the per-call cost of the
        driver below SQLite's own part of the work.
        """
        with self.db.reading() as c:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                yield from c.execute(sql.format(", ".join("?" * len(chunk))), (*params, *chunk))


def _not_writable(path: str, reason: str) -> LedgerUnavailable:
    msg = (
        f"the ledger {path} cannot be used ({reason}: it cannot be written here); fix the permissions of "
        "the file and its folder, or the mount, then run the same command again; `runner runs`, `status`, "
        "`report` and `export` can read it as it is"
    )
    return LedgerUnavailable(msg, path=path, reason=reason)
