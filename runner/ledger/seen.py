"""A set of keys too large for memory: the answer keys a job has shown so far, in a private temporary
SQLite database (on disk past its cache), so memory stays flat at any size of job."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence


class SeenKeys:
    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False)
        self._db.execute("CREATE TABLE seen (key BLOB PRIMARY KEY) WITHOUT ROWID")

    def which(self, keys: Sequence[bytes]) -> set[bytes]:
        """The keys of `keys` added before."""
        if not keys:
            return set()
        query = f"SELECT key FROM seen WHERE key IN ({', '.join('?' * len(keys))})"  # noqa: S608
        return {row[0] for row in self._db.execute(query, list(keys))}

    def add(self, keys: Sequence[bytes]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", [(k,) for k in keys])

    def close(self) -> None:
        self._db.close()
