"""One run, many workers: the processes that send a run, the chunks of it they claim, and the
limits they keep together.

A worker joins a run (a row in `workers`), says it is alive every second (its counts and its share
of the run's concurrency with it), claims the job's lines a chunk at a time from the run's counter
(`runs.next_chunk`: chunk i is the lines i × size + 1 … (i + 1) × size), and marks the chunk's
pending requests as its own (`requests.worker_id`). A worker whose sign of life lapses (or whose
process is gone, on this host) is taken over by the next worker that looks: its requests in flight
become possibly billed, its claimed and unsent ones go back to the pool, which the others drain once
the counter has passed the end of the job.

Every statement here runs in a write transaction, and write transactions are serialized (SQLite's
writer lock; on PostgreSQL the ledger's advisory lock), so a claim can never be made twice; claims
of a lapsed worker's requests also take `FOR UPDATE SKIP LOCKED` on PostgreSQL.

Limits for the whole run are token buckets kept in `run_limits`, on the ledger's clock (the
database's, so hosts whose clocks differ share one measure).
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from runner.ledger.base import owner_alive
from runner.ledger.db import parse_time
from runner.ledger.holds import HoldOps
from runner.ledger.tx import Tx

WORKER_STALE_S = 30.0  # a worker not seen for this long is taken for gone (at once when its pid is)
UNFINISHED = "('pending', 'reserved', 'sending')"
# a request no running worker holds (the subquery's parameter: the run's id)
UNHELD = (
    "(worker_id IS NULL OR worker_id NOT IN (SELECT id FROM workers WHERE run_id = ? AND state = 'running'))"
)
INTERRUPTED = {"error_type": "interrupted", "error_message": "the process stopped during the request"}
WORKER_COLUMNS = "id, host, pid, state, started_at, seen_at, finished_at, sent, ok, failed, slots"


def worker_name() -> str:
    """A worker's id: host, process id, and a tag (one process may run several runs in turn)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: str
    host: str
    pid: int
    state: str
    started_at: datetime | None
    seen_at: datetime | None
    finished_at: datetime | None
    sent: int
    ok: int
    failed: int
    slots: int

    @property
    def per_minute(self) -> float:
        """Requests sent per minute over the time it has worked."""
        start, end = self.started_at, self.finished_at or self.seen_at
        if start is None or end is None:
            return 0.0
        seconds = (end - start).total_seconds()
        return self.sent / seconds * 60 if seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Joined:
    alone: bool  # no other live worker: this one starts a session of the run
    slots: int  # its share of the run's concurrency, to begin with
    taken_over: int  # lapsed workers whose requests it took over


@dataclass(frozen=True, slots=True)
class Beat:
    alive: bool  # False: the others took this worker for gone and took its requests over
    slots: int  # its share of the run's concurrency now


def _params(run_id: str, state: str, worker_id: str | None) -> tuple[str, ...]:
    return (run_id, state) if worker_id is None else (run_id, state, worker_id)


def _host_pid(worker_id: str) -> tuple[str, int]:
    host, _, rest = worker_id.partition(":")
    pid = rest.split(":", 1)[0]
    return host, int(pid) if pid.isdigit() else 0


def _share(concurrency: int, others: list[tuple[str, int]], worker_id: str) -> int:
    """This worker's share of the run's concurrency: an even split (the remainder to the first
    workers by id, so that each works out the same split), and never more than the others leave
    (their recorded slots include their requests still in flight), so the run as a whole never
    exceeds `concurrency`."""
    order = sorted([*(w for w, _ in others), worker_id])
    count = len(order)
    fair = concurrency // count + (1 if order.index(worker_id) < concurrency % count else 0)
    left = concurrency - sum(s for _, s in others)
    return max(0, min(fair, left))


class WorkerOps(HoldOps):
    """The workers that send a run: joining, signs of life, claims, take-over, shared limits."""

    def recover_rows(self, tx: Tx, run_id: str, worker_id: str | None = None) -> tuple[int, int]:
        """What a stopped process left: `sending` requests are unknown outcomes (possibly billed, the
        attempt recorded as unknown), `reserved` ones were never sent (their hold is released). Only the
        rows of `worker_id` when given. Returns (possibly billed, released)."""
        mine = "" if worker_id is None else " AND worker_id = ?"
        select = "SELECT id, attempts FROM requests WHERE run_id = ? AND state = ?" + mine  # noqa: S608
        sending = tx.conn.execute(select, _params(run_id, "sending", worker_id)).fetchall()
        reserved = tx.conn.execute(select, _params(run_id, "reserved", worker_id)).fetchall()
        for row_id, number in sending:
            tx.attempt(int(row_id), int(number), "unknown", None, INTERRUPTED["error_message"], None)
            self.mark_possibly_billed(tx, int(row_id), INTERRUPTED)
        for row_id, _ in reserved:
            self.release(tx, int(row_id), state="pending", fields={})
        return len(sending), len(reserved)

    def join_run(self, run_id: str, worker_id: str, concurrency: int, *, to_send: bool = True) -> Joined:
        """Register `worker_id` on the run. The first live worker starts a session: what earlier
        processes left is recovered, every claim and the chunk counter start afresh, and the run is
        `running` again. Not `to_send` (a reconciliation holding the run): only the recovery."""
        host, pid = _host_pid(worker_id)
        with self.transaction() as tx:
            taken = self.take_over_lapsed(tx, run_id, worker_id)
            others = self._live_others(tx, run_id, worker_id)
            alone = not others
            if alone:
                self.recover_rows(tx, run_id)
            if alone and to_send:
                tx.conn.execute(
                    f"UPDATE requests SET worker_id = NULL WHERE run_id = ? AND state IN {UNFINISHED}",  # noqa: S608
                    (run_id,),
                )
                tx.conn.execute(
                    "UPDATE runs SET next_chunk = 0, finished_at = NULL, reason = NULL,"
                    " state = CASE WHEN state = 'preparing' THEN state ELSE 'running' END WHERE id = ?",
                    (run_id,),
                )
            slots = concurrency if alone else _share(concurrency, others, worker_id)
            tx.conn.execute(
                f"INSERT INTO workers ({WORKER_COLUMNS}, run_id)"  # noqa: S608 - our names
                " VALUES (?, ?, ?, 'running', ?, ?, NULL, 0, 0, 0, ?, ?)",
                (worker_id, host, pid, tx.now, tx.now, slots, run_id),
            )
        return Joined(alone, slots, len(taken))

    def _live_others(self, tx: Tx, run_id: str, worker_id: str) -> list[tuple[str, int]]:
        """(id, slots) of the run's other running workers."""
        rows = tx.conn.execute(
            "SELECT id, slots FROM workers WHERE run_id = ? AND state = 'running' AND id != ?",
            (run_id, worker_id),
        ).fetchall()
        return [(str(w), int(s)) for w, s in rows]

    def heartbeat(
        self, tx: Tx, run_id: str, worker_id: str, counts: Sequence[int], concurrency: int, in_flight: int
    ) -> Beat:
        """The worker's sign of life with its counts (sent, ok, failed); its share of the concurrency is
        worked out again (workers join and leave). Not alive when the others took it for gone."""
        share = _share(concurrency, self._live_others(tx, run_id, worker_id), worker_id)
        cursor = tx.conn.execute(
            "UPDATE workers SET seen_at = ?, sent = ?, ok = ?, failed = ?, slots = ?"
            " WHERE id = ? AND state = 'running'",
            (tx.now, *counts, max(share, in_flight), worker_id),
        )
        tx.conn.execute("UPDATE runs SET seen_at = ? WHERE id = ? AND owner = ?", (tx.now, run_id, worker_id))
        return Beat(bool(cursor.rowcount), share)

    def touch_worker(self, tx: Tx, run_id: str, worker_id: str) -> bool:
        """A sign of life while the worker prepares; False when the others took it for gone, or when
        the run it is making was taken by another process (it was taken for gone)."""
        alive = tx.conn.execute(
            "UPDATE workers SET seen_at = ? WHERE id = ? AND state = 'running'", (tx.now, worker_id)
        ).rowcount
        run = tx.conn.execute("SELECT state, owner FROM runs WHERE id = ?", (run_id,)).fetchone()
        if run is None or (run[0] == "preparing" and run[1] != worker_id):
            return False
        tx.conn.execute("UPDATE runs SET seen_at = ? WHERE id = ? AND owner = ?", (tx.now, run_id, worker_id))
        return bool(alive)

    def take_over_lapsed(
        self, tx: Tx, run_id: str, worker_id: str, stale_after_s: float = WORKER_STALE_S
    ) -> list[str]:
        """Workers of the run gone silent (or whose process is gone, on this host): their requests in
        flight become possibly billed, their claimed ones go back to the pool. Returns their ids."""
        rows = tx.conn.execute(
            "SELECT id, seen_at FROM workers WHERE run_id = ? AND state = 'running' AND id != ?",
            (run_id, worker_id),
        ).fetchall()
        gone = [str(w) for w, seen in rows if not owner_alive(str(w), parse_time(seen), stale_after_s)]
        for lapsed in gone:
            self.recover_rows(tx, run_id, lapsed)
            tx.conn.execute(
                "UPDATE requests SET worker_id = NULL WHERE run_id = ? AND worker_id = ?"  # noqa: S608
                f" AND state IN {UNFINISHED}",
                (run_id, lapsed),
            )
            tx.conn.execute(
                "UPDATE workers SET state = 'gone', finished_at = ? WHERE id = ?", (tx.now, lapsed)
            )
        return gone

    def claim_chunk(self, tx: Tx, run_id: str, worker_id: str, size: int) -> int:
        """The next chunk of the job's lines for this worker, its pending requests claimed."""
        (after,) = tx.conn.execute(
            "UPDATE runs SET next_chunk = next_chunk + 1 WHERE id = ? RETURNING next_chunk", (run_id,)
        ).fetchone()
        index = int(after) - 1
        tx.conn.execute(
            "UPDATE requests SET worker_id = ? WHERE run_id = ? AND line > ? AND line <= ?"  # noqa: S608
            f" AND state = 'pending' AND {UNHELD}",
            (worker_id, run_id, index * size, (index + 1) * size, run_id),
        )
        return index

    def claim_orphans(self, tx: Tx, run_id: str, worker_id: str, limit: int) -> list[int]:
        """Pending requests no worker holds (a lapsed worker's, or one that stopped), up to `limit`, for
        this worker; their line numbers, in order."""
        rows = tx.conn.execute(
            f"SELECT id, line FROM requests WHERE run_id = ? AND state = 'pending' AND {UNHELD}"  # noqa: S608
            f" ORDER BY line LIMIT ?{self.db.skip_locked}",
            (run_id, run_id, limit),
        ).fetchall()
        if rows:
            tx.conn.executemany(
                "UPDATE requests SET worker_id = ? WHERE id = ?", [(worker_id, int(row[0])) for row in rows]
            )
        return [int(row[1]) for row in rows]

    def others_unfinished(self, tx: Tx, run_id: str, worker_id: str) -> int:
        """Requests of the run other running workers hold and have not finished."""
        row = tx.conn.execute(
            f"SELECT count(*) FROM requests WHERE run_id = ? AND state IN {UNFINISHED}"  # noqa: S608
            " AND worker_id IN (SELECT id FROM workers WHERE run_id = ? AND state = 'running' AND id != ?)",
            (run_id, run_id, worker_id),
        ).fetchone()
        return int(row[0])

    def leave_run(self, run_id: str, worker_id: str, counts: Sequence[int], *, forget: bool = False) -> bool:
        """The worker stops: its unsent claims go back to the pool; True when it finishes the run: it
        was the run's last live worker, or the run has nothing left to send. `forget`: it sent nothing
        (a reconciliation held the run): its row goes."""
        with self.transaction() as tx:
            if forget:
                tx.conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
            tx.conn.execute(
                "UPDATE requests SET worker_id = NULL"
                " WHERE run_id = ? AND worker_id = ? AND state = 'pending'",
                (run_id, worker_id),
            )
            tx.conn.execute(
                "UPDATE workers SET state = CASE WHEN state = 'running' THEN 'left' ELSE state END,"
                " finished_at = ?, seen_at = ?, sent = ?, ok = ?, failed = ?, slots = 0 WHERE id = ?",
                (tx.now, tx.now, *counts, worker_id),
            )
            self.take_over_lapsed(tx, run_id, worker_id)
            (unfinished,) = tx.conn.execute(
                f"SELECT count(*) FROM requests WHERE run_id = ? AND state IN {UNFINISHED}",  # noqa: S608
                (run_id,),
            ).fetchone()
            # nothing left to send: this worker finishes the run even if another one has not left yet
            # (it may have died after its last request, on a host where that is not seen at once)
            return not unfinished or not self._live_others(tx, run_id, worker_id)

    def workers(self, run_id: str) -> list[WorkerView]:
        with self.reading() as c:
            rows = c.execute(
                f"SELECT {WORKER_COLUMNS} FROM workers WHERE run_id = ? ORDER BY started_at, id",  # noqa: S608
                (run_id,),
            ).fetchall()
        return [
            WorkerView(
                str(w),
                str(h),
                int(p),
                str(s),
                parse_time(a),
                parse_time(b),
                parse_time(c_),
                int(n),
                int(o),
                int(f),
                int(sl),
            )
            for w, h, p, s, a, b, c_, n, o, f, sl in rows
        ]

    def take_units(
        self,
        tx: Tx,
        run_id: str,
        name: str,
        per_second: float,
        capacity: int,
        want: int,
        *,
        start_empty: bool,
    ) -> tuple[int, float]:
        """Up to `want` units from the run's bucket `name` (filled at `per_second`, up to `capacity`):
        (units granted, seconds until the next unit when none were)."""
        (now,) = tx.conn.execute(self.db.clock_sql).fetchone()
        now = float(now)
        row = tx.conn.execute(
            "SELECT level, stamp FROM run_limits WHERE run_id = ? AND name = ?", (run_id, name)
        ).fetchone()
        if row is None:
            level, stamp = (0 if start_empty else capacity), now
            tx.conn.execute(
                "INSERT INTO run_limits (run_id, name, level, stamp) VALUES (?, ?, ?, ?)",
                (run_id, name, level, stamp),
            )
        else:
            level, stamp = int(row[0]), float(row[1])
        gained = math.floor(max(0.0, now - stamp) * per_second)
        if gained:  # the fraction of a unit not yet earned stays in the stamp
            stamp += gained / per_second
            level += gained
        if level >= capacity:
            level, stamp = capacity, max(stamp, now)
        granted = min(want, level)
        level -= granted
        tx.conn.execute(
            "UPDATE run_limits SET level = ?, stamp = ? WHERE run_id = ? AND name = ?",
            (level, stamp, run_id, name),
        )
        wait = 0.0 if granted else max(0.001, (stamp + 1 / per_second) - now)
        return granted, wait


__all__ = ["WORKER_STALE_S", "Beat", "Joined", "WorkerOps", "WorkerView", "worker_name"]
