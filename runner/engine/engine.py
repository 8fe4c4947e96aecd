"""The run phase: reserve → send → settle, concurrently, inside the budget, resumable.

Per request: a durable reservation (grouped commit) → `sending` recorded → the call, retried through
tenacity while the provider calls the error retryable → one transaction that settles the charge with
the response, or releases the reservation, or keeps it as possibly billed when the outcome is unknown.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from pathlib import Path

import anyio

from runner.core.config import RunConfig
from runner.core.errors import LedgerUnavailable
from runner.core.events import Listener, Notice
from runner.engine.claims import Claims, _Pending
from runner.engine.membership import Membership
from runner.engine.plan import Plan
from runner.engine.request import Requests
from runner.engine.stopping import Stopping
from runner.ledger import KeptAnswer, Ledger, Writer
from runner.providers.limits import Limits
from runner.providers.registry import Connection


class Engine(Requests, Claims, Membership, Stopping):
    """One worker's run phase: its parts by job (request.py, claims.py, membership.py, stopping.py)
    share the state declared in state.py."""

    def __init__(
        self,
        conn: Connection,
        ledger: Ledger,
        plan: Plan,
        config: RunConfig,
        on_event: Listener,
        limits: Limits | None = None,
    ) -> None:
        self.provider = conn.provider
        self.scope = conn.scope
        self.ledger = ledger
        self.plan = plan
        self.config = config
        self.on_event = on_event
        self.writer = Writer(ledger)
        self.limits = limits or Limits.of(config)
        self.limit = self.limits.window
        self.worker = plan.owner
        self.limit.set_maximum(plan.slots)  # this worker's share of the run's concurrency (0: none yet)
        self.limits.share(self._take_units)  # --rpm, --tpm and the spend rate hold for the whole run
        self.counts = [0, 0, 0]  # this worker's requests sent, ok, failed
        self.stopping = anyio.Event()
        self.aborted = False
        self._work = anyio.CancelScope()
        self.reason: str | None = None
        self.state = "done"
        self._taken: set[int] = set()  # rows handed to a worker whose request has not finished
        self._counter = itertools.count()
        self.over_quote = 0  # requests charged above their hold (a price table too low)
        self._sent_at: dict[int, float] = {}  # requests in flight: when their attempt went out
        self._latencies: deque[float] = deque(maxlen=512)  # recent calls' times, for "stalled"
        self.ledger_gone: str | None = None  # the ledger's file was deleted or replaced under the run
        self.unsaved: list[KeptAnswer] = []  # answers paid for whose settlement could not commit

    async def run(self, job: Path) -> None:
        """Launch every pending request; the writer outlives the work so that an abort can be
        recorded, and answers whose settlement failed are kept whatever ended the work."""
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self.writer.run)
                try:
                    await self._run_tasks(job)
                finally:
                    self.writer.close()
        finally:
            if self.unsaved:
                with anyio.CancelScope(shield=True):
                    await self._keep_unsaved()

    async def _run_tasks(self, job: Path) -> None:
        async with anyio.create_task_group() as aux:  # funds reports, signal watcher, grace timer
            aux.start_soon(self._report_funds)
            if self.config.deadline is not None:
                aux.start_soon(self._stop_at_deadline, self.config.deadline)
            if self.config.handle_signals:
                aux.start_soon(self._watch_signals, aux)
            try:
                with self._work:
                    await self._launch_all(job)
            finally:
                aux.cancel_scope.cancel()

    async def _keep_unsaved(self) -> None:
        """Answers paid for whose settlement failed: written now if the ledger takes them again, else
        kept in the run's recovery file, which the next worker of the run applies first."""
        answers, self.unsaved = self.unsaved, []
        try:
            await anyio.to_thread.run_sync(self.ledger.settle_kept, answers)
            return
        except LedgerUnavailable:
            pass
        try:
            path = await anyio.to_thread.run_sync(self.ledger.keep_answers, self.plan.run_id, answers)
        except OSError as exc:
            self.unsaved = answers
            msg = f"{len(answers)} answer(s) paid for could not be kept either ({exc.strerror})"
            self.on_event(Notice(f"{msg}: they are charged; `runner reconcile` finds their charges"))
            return
        self.on_event(
            Notice(
                f"{len(answers)} answer(s) paid for could not be written to the ledger: kept in {path}; "
                "running the job again writes them before anything else"
            )
        )

    async def _launch_all(self, job: Path) -> None:
        """Workers take the pending lines in file order; the next chunk is read while they run.

        A fixed set of workers, as many as the concurrency cap, rather than a task per request:
        spawning a task costs as much as the rest of a request's bookkeeping.
        """
        # the next chunk is claimed once a quarter of one is left: what this worker has not claimed
        # is left to the run's other workers
        pending = _Pending(max(1, self.plan.chunk_lines // 4))
        async with anyio.create_task_group() as reader:
            reader.start_soon(self._read_pending, job, pending)
            async with anyio.create_task_group() as workers:
                for _ in range(self.config.concurrency):
                    workers.start_soon(self._worker, pending)
            reader.cancel_scope.cancel()

    async def _worker(self, pending: _Pending) -> None:
        """Run requests one after another. A settlement is posted, not awaited: it commits with the
        next request's reservation (the writer keeps their order), and is awaited after that."""
        settling: asyncio.Future[None] | None = None
        try:
            while not self.stopping.is_set():
                item = await pending.take()
                if item is None:
                    return
                await self.limit.acquire()
                if self.stopping.is_set():
                    self.limit.release()
                    return
                request, row = item
                try:
                    posted = await self._request(request, row.id, row.quote_nanos, row.attempts)
                except LedgerUnavailable as exc:  # the others' calls in flight finish all the same
                    self.ledger_failed(exc)
                    return
                if settling is not None:
                    await settling
                settling = posted
        finally:
            if settling is not None:
                with anyio.CancelScope(shield=True):
                    await settling


__all__ = ["Engine"]
