"""The job's lines a worker sends: chunks claimed from the run's counter and read from the file,
then what stopped workers left, handed to the worker's tasks in file order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from runner.core.jobs import JobChunks
from runner.core.models import ChatRequest
from runner.engine.plan import changed
from runner.engine.state import EngineState

ORPHANS_POLL_S = 1.0  # a worker with nothing left looks this often for requests a lapsed one left


class Claims(EngineState):
    async def _read_pending(self, job: Path, pending: _Pending) -> None:
        """Claim the job's chunks from the run's counter and read them (other workers claim the
        others); past the end, the requests no worker holds (a stopped worker's), until no other
        worker holds any unfinished."""
        ledger, run_id, me, size = self.ledger, self.plan.run_id, self.worker, self.plan.chunk_lines

        def rows_of(chunk: list[ChatRequest]) -> list[tuple[ChatRequest, Any]]:
            rows = ledger.request_rows(run_id, [r.custom_id for r in chunk])
            for r in chunk:
                row = rows.get(r.custom_id)
                if row is None or row.sha256 != r.sha256:
                    raise changed(job, r, run_id, "is new" if row is None else "changed")
            found = ((r, rows[r.custom_id]) for r in chunk)
            return [
                (r, row)
                for r, row in found
                if row.state == "pending" and row.quote_nanos is not None and row.worker_id == me
            ]

        # each line was validated before its row was made; an unchanged hash means it still is
        lines = JobChunks(job, size, self.config.max_line_bytes)
        try:
            while not self.stopping.is_set():
                index = await self.writer.submit(lambda db: ledger.claim_chunk(db, run_id, me, size))
                chunk = await anyio.to_thread.run_sync(lines.take, index)
                if chunk is None:
                    break
                await pending.wait_for_room()
                pending.add(self._untaken(await anyio.to_thread.run_sync(rows_of, chunk)))
            while not self.stopping.is_set():
                claimed = await self.writer.submit(lambda db: ledger.claim_orphans(db, run_id, me, size))
                if claimed:
                    await self._read_lines(job, claimed, pending, rows_of)
                elif await self.writer.submit(lambda db: ledger.others_unfinished(db, run_id, me)):
                    await anyio.sleep(ORPHANS_POLL_S)
                else:
                    break
        finally:
            pending.close()
            lines.close()

    async def _read_lines(
        self,
        job: Path,
        numbers: list[int],
        pending: _Pending,
        rows_of: Callable[[list[ChatRequest]], list[Any]],
    ) -> None:
        """The chunks holding these line numbers, read again from the start of the job."""
        size = self.plan.chunk_lines
        lines = JobChunks(job, size, self.config.max_line_bytes)
        try:
            for index in sorted({(n - 1) // size for n in numbers}):
                chunk = await anyio.to_thread.run_sync(lines.take, index)
                if chunk is None:
                    break
                await pending.wait_for_room()
                pending.add(self._untaken(await anyio.to_thread.run_sync(rows_of, chunk)))
        finally:
            lines.close()

    def _untaken(self, items: list[tuple[ChatRequest, Any]]) -> list[tuple[ChatRequest, Any]]:
        """The rows no worker holds. A line copied in the file since the run began (same custom_id,
        same hash) names a row that still reads `pending` until its first copy is reserved: it runs
        once. The set holds only what is read ahead or in flight."""
        fresh = []
        for item in items:
            if item[1].id not in self._taken:
                self._taken.add(item[1].id)
                fresh.append(item)
        return fresh


class _Pending:
    """The pending requests read so far, in file order, for the workers to take."""

    def __init__(self, room: int) -> None:
        self.room = room  # read ahead while no more than this many wait
        self._items: deque[tuple[ChatRequest, Any]] = deque()
        self._closed = False
        self._changed = anyio.Event()  # set when items arrive, are taken below the mark, or it closes

    def _signal(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def add(self, items: list[tuple[ChatRequest, Any]]) -> None:
        self._items.extend(items)
        self._signal()

    def close(self) -> None:
        self._closed = True
        self._signal()

    async def wait_for_room(self) -> None:
        while len(self._items) > self.room:
            await self._changed.wait()

    async def take(self) -> tuple[ChatRequest, Any] | None:
        """The next request, or None when the job has no more."""
        while not self._items:
            if self._closed:
                return None
            await self._changed.wait()
        item = self._items.popleft()
        if len(self._items) == self.room:
            self._signal()
        return item
