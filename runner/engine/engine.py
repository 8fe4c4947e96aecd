"""The run phase: reserve → send → settle, concurrently, inside the budget, resumable.

Per request: a durable reservation (grouped commit) → `sending` recorded → the call, retried through
tenacity while the provider calls the error retryable → one transaction that settles the charge with
the response, or releases the reservation, or keeps it as possibly billed when the outcome is unknown.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from runner.core import codec
from runner.core.config import RunConfig
from runner.core.errors import (
    OutcomeUnknown,
    ProviderError,
    RequestFatalError,
    RetryableError,
    RunFatalError,
    printable,
)
from runner.core.events import Funds, Listener, Notice, RequestFinished, Retrying
from runner.core.jobs import JobChunks
from runner.core.models import ChatRequest, Outcome
from runner.core.money import format_usd, to_nanos
from runner.engine.plan import Plan, changed
from runner.ledger import Ledger, Settlement
from runner.ledger.tx import CLIENT_REQUEST_ID, IDEMPOTENCY_KEY, Hold, client_request_id
from runner.ledger.tx import Tx as Db
from runner.ledger.workers import (
    WORKER_STALE_S,
    claim_chunk,
    claim_orphans,
    heartbeat,
    others_unfinished,
    take_over_lapsed,
    take_units,
)
from runner.ledger.writer import Writer
from runner.providers.limits import Limits
from runner.providers.registry import Connection
from runner.providers.retry import first_wait, retrying

FUNDS_EVERY_S = 1.0  # the funds shown, and the worker's sign of life with its counts
TAKE_OVER_EVERY_S = 5.0  # how often a worker looks for the run's lapsed workers
ORPHANS_POLL_S = 1.0  # a worker with nothing left looks this often for requests a lapsed one left
STALL_FACTOR = 5.0  # in flight this many times the median call: shown as stalled
STALL_MIN_S = 10.0
DONE_STATES = frozenset({"ok", "failed", "skipped"})


class Engine:
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

    def stop(self, state: str, reason: str) -> None:
        if not self.stopping.is_set():
            self.state, self.reason = state, reason
            self.on_event(Notice(reason))
            self.stopping.set()

    async def run(self, job: Path) -> None:
        """Launch every pending request; the writer outlives the work so that an abort can be recorded."""
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.writer.run)
            try:
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
            finally:
                self.writer.close()

    async def _stop_at_deadline(self, deadline: float) -> None:
        await anyio.sleep(max(0.0, deadline - time.time()))
        when = time.strftime("%H:%M:%S", time.localtime(deadline))
        self.stop("stopped", f"deadline {when} reached: nothing more is launched, what is in flight finishes")

    async def _take_units(
        self, name: str, per_second: float, capacity: int, want: int, start_empty: bool
    ) -> tuple[int, float]:
        """Units of one of the run's shared limits, from the ledger (`workers.take_units`)."""
        ledger, run_id = self.ledger, self.plan.run_id
        return await self.writer.submit(
            lambda db: take_units(
                ledger, db, run_id, name, per_second, capacity, want, start_empty=start_empty
            )
        )

    async def _beat(self) -> None:
        """The worker's sign of life, with its counts; its share of the run's concurrency back."""
        run_id, worker, counts = self.plan.run_id, self.worker, self.counts[:]
        concurrency, in_flight = self.config.concurrency, self.limit.in_flight
        beat = await self.writer.submit(
            lambda db: heartbeat(db, run_id, worker, counts, concurrency, in_flight)
        )
        if not beat.alive:
            self.stop(
                "stopped",
                f"this worker was taken for gone by the run's other workers (no sign of life for "
                f"{WORKER_STALE_S:g} s): they took its requests over",
            )
            return
        self.limit.set_maximum(beat.slots)

    async def _take_over(self) -> None:
        run_id, worker = self.plan.run_id, self.worker
        for lapsed in await self.writer.submit(lambda db: take_over_lapsed(db, run_id, worker)):
            self.on_event(
                Notice(
                    f"worker {lapsed} stopped: the others send its claimed requests; those it had in "
                    "flight are possibly billed"
                )
            )

    async def _report_funds(self) -> None:
        """Every second the budget's funds and the worker's sign of life; every few seconds a look
        for the run's workers that stopped."""
        last_look = time.monotonic()
        while True:
            gone = self.ledger.db.gone()
            if gone is not None and self.ledger_gone is None:
                self.ledger_gone = gone
                self.stop("stopped", f"the ledger file {self.ledger.db.path} was {gone} during the run")
            view = await anyio.to_thread.run_sync(self.ledger.budget_by_id, self.plan.budget_id)
            funds = (view.spent_nanos, view.reserved_nanos, view.possibly_billed_nanos, view.remaining_nanos)
            self.on_event(Funds(*funds, stalled=self._stalled()))
            await self._beat()
            if time.monotonic() - last_look >= TAKE_OVER_EVERY_S:
                last_look = time.monotonic()
                await self._take_over()
            await anyio.sleep(FUNDS_EVERY_S)

    def _stalled(self) -> int:
        """Requests in flight STALL_FACTOR times longer than the median call (and over 10 s)."""
        if len(self._latencies) < 20:
            return 0
        limit = max(STALL_MIN_S, STALL_FACTOR * statistics.median(self._latencies))
        now = time.monotonic()
        return sum(now - sent > limit for sent in list(self._sent_at.values()))

    def abort(self, reason: str) -> None:
        """Cancel in-flight requests now; the run's `sending` rows are then marked possibly billed."""
        self.aborted = True
        if self.stopping.is_set():
            self.on_event(Notice(reason))
        else:
            self.stop("interrupted", reason)
        self._work.cancel()

    async def _watch_signals(self, aux: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self.stopping.is_set():
                    self.abort("second interrupt: aborting; requests in flight are marked possibly billed")
                    return
                grace = self.config.grace_s
                self.stop(
                    "interrupted",
                    f"interrupted: no new requests; finishing those in flight (up to {grace:g} s, "
                    "Ctrl-C again to abort)",
                )
                aux.start_soon(self._grace_then_abort)

    async def _grace_then_abort(self) -> None:
        await anyio.sleep(self.config.grace_s)
        self.abort(f"grace period of {self.config.grace_s:g} s over: aborting the requests still in flight")

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
                posted = await self._request(request, row.id, row.quote_nanos, row.attempts)
                if settling is not None:
                    await settling
                settling = posted
        finally:
            if settling is not None:
                with anyio.CancelScope(shield=True):
                    await settling

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
                index = await self.writer.submit(lambda db: claim_chunk(db, run_id, me, size))
                chunk = await anyio.to_thread.run_sync(lines.take, index)
                if chunk is None:
                    break
                await pending.wait_for_room()
                pending.add(self._untaken(await anyio.to_thread.run_sync(rows_of, chunk)))
            while not self.stopping.is_set():
                claimed = await self.writer.submit(lambda db: claim_orphans(ledger, db, run_id, me, size))
                if claimed:
                    await self._read_lines(job, claimed, pending, rows_of)
                elif await self.writer.submit(lambda db: others_unfinished(db, run_id, me)):
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

    async def _request(
        self, request: ChatRequest, row_id: int, quote: int, done_attempts: int
    ) -> asyncio.Future[None] | None:
        """One request from reservation to its final ledger write; a settlement comes back posted."""
        try:
            budget_id, run_id = self.plan.budget_id, self.plan.run_id
            first = done_attempts + 1
            await self._pace(request)
            await self.limits.spend(quote)
            if self.stopping.is_set():
                return None

            def reserve_and_mark(db: Db) -> bool | None:
                # one commit: held, then `sending` (recorded before the call, as every attempt is);
                # None when the request is no longer this worker's (it was taken for gone)
                hold = Hold(quote, budget_id, run_id)
                return self.ledger.reserve_and_send(db, hold, row_id, worker=self.worker, attempt=first)

            granted = await self.writer.submit(reserve_and_mark)
            if granted is None:
                return None
            if not granted:
                reason = "budget reached: the next reservation did not fit"
                if self.over_quote:
                    reason += (
                        f" ({self.over_quote} request(s) were charged above their quotes: the price "
                        "file's prices or template allowances are too low)"
                    )
                self.stop("stopped", reason)
                return None
            self.counts[0] += 1
            return await self._send_with_retries(request, row_id, quote, done_attempts)
        finally:
            self.limit.release()
            self._taken.discard(row_id)  # its row no longer reads `pending` (or the run is stopping)

    def _retried(self, attempt: int, wait: float, error: BaseException | None) -> None:
        self.on_event(Retrying("", attempt, wait, str(error)))

    async def _attempts(self, request: ChatRequest, row_id: int, tries: list[int]) -> Outcome | None:
        """The first attempt directly (most calls succeed at once: tenacity's loop costs more than a
        call's own bookkeeping), the rest through `retry.retrying`.

        None means the run is stopping between attempts: the request goes back to pending.
        """
        tries[0] += 1
        try:
            return await self._attempt(request, row_id, tries[0], first=True)
        except RetryableError as exc:
            if self.config.policy.attempts <= 1:
                raise
            after = first_wait(self.config.policy, exc)
            self._retried(1, after, exc)
            await anyio.sleep(after)
        async for attempt in retrying(self.config.policy, self._retried, made=1):
            with attempt:
                if self.stopping.is_set():
                    return None
                tries[0] += 1
                return await self._attempt(request, row_id, tries[0], first=False)
        raise AssertionError  # pragma: no cover - tenacity returns, retries or re-raises

    async def _send_with_retries(
        self, request: ChatRequest, row_id: int, quote: int, done_attempts: int
    ) -> asyncio.Future[None] | None:
        tries = [done_attempts]  # attempts made so far, counted across processes
        try:
            outcome = await self._attempts(request, row_id, tries)
            if outcome is None:
                await self._finish(row_id, request, "pending", None, tries[0], self.reason)
                return None
            return self._settle(request, row_id, quote, outcome, tries[0])
        except RetryableError as exc:
            await self._finish(row_id, request, "failed", exc, tries[0], "retries exhausted")
        except RequestFatalError as exc:
            await self._finish(row_id, request, "failed", exc, tries[0], None)
        except RunFatalError as exc:
            await self._finish(row_id, request, "pending", exc, tries[0], None)
            self.stop("stopped", f"the provider stopped the run: {exc}")
        except OutcomeUnknown as exc:
            await self._finish(row_id, request, "possibly_billed", exc, tries[0], None)
        except _TakenOver:  # possibly billed now, by the worker that took it over
            pass
        return None

    async def _pace(self, request: ChatRequest) -> None:
        """Wait for the RPM and TPM buckets (before the reservation, so no hold waits on them)."""
        await self.limits.pace(request)
        paused = getattr(self.provider, "paused_until", 0.0) - time.monotonic()
        if paused > 0:  # the server said its limit is used up until its reset
            await anyio.sleep(paused)

    def _headers(self, row_id: int, number: int) -> dict[str, str]:
        """What the provider may record of an attempt: its id (kept in the ledger's attempts, matched
        by `runner reconcile`), and the request's idempotency key, the same for every attempt and every
        re-send of the request, so a provider that honours it charges the request once."""
        run = self.plan.run_id
        return {
            CLIENT_REQUEST_ID: client_request_id(run, row_id, number),
            IDEMPOTENCY_KEY: f"runner-{run}-{row_id}",
        }

    async def _attempt(self, request: ChatRequest, row_id: int, number: int, *, first: bool) -> Outcome:
        if not first:  # the first attempt was paced and marked `sending` with its reservation
            await self._pace(request)
            worker = self.worker

            def mark(db: Db) -> bool:
                if not still_mine(db, row_id, "sending", worker):
                    return False
                self.ledger.mark_sending(db, row_id, number)
                return True

            if not await self.writer.submit(mark):
                raise _TakenOver
        started = self._sent_at[row_id] = time.monotonic()
        try:
            outcome = await self.provider.complete(request, self._headers(row_id, number))
        except RetryableError as exc:
            self._sent_at.pop(row_id, None)
            if exc.status == 429 or exc.code == "RATE_LIMITED":
                self.limit.on_rate_limited(started)
            latency = time.monotonic() - started
            error = exc
            await self.writer.submit(lambda db: _record(db, row_id, number, "retry", error, latency))
            raise
        finally:
            self._sent_at.pop(row_id, None)
        self._latencies.append(time.monotonic() - started)
        return outcome

    def _settle(
        self, request: ChatRequest, row_id: int, quote: int, outcome: Outcome, attempts: int
    ) -> asyncio.Future[None]:
        """Post the settlement: the charge, with the response, in one transaction."""
        self.limit.on_success()
        hold = Hold(quote, self.plan.budget_id, self.plan.run_id)  # what `_request` reserved
        message = outcome.message
        price = None if outcome.price is None else to_nanos(outcome.price)
        fields: dict[str, Any] = {
            "attempts": attempts,
            "prompt_tokens": outcome.usage.prompt_tokens,
            "completion_tokens": outcome.usage.completion_tokens,
            "reasoning_tokens": outcome.usage.reasoning_tokens,
            "cached_tokens": outcome.usage.cached_tokens,
            "content": message.get("content"),
            "reasoning_content": message.get("reasoning_content") or message.get("reasoning"),
            "tool_calls": codec.dumps_text(message["tool_calls"]) if message.get("tool_calls") else None,
            "finish_reason": outcome.finish_reason,
            "response_json": codec.dumps_text(outcome.completion),
            "latency_s": outcome.latency_s,
            "first_token_s": outcome.first_token_s,
            "error_type": None if price is not None else "price_unknown",
            "error_message": None if price is not None else "no price reported; charged the quote",
        }

        if price is not None and price > quote:
            self.over_quote += 1
            if self.over_quote == 1:
                self.on_event(
                    Notice(
                        f"{printable(request.custom_id)} was charged {format_usd(price)}, above its quote of "
                        f"{format_usd(quote)}: the excess counts against the budget; check the "
                        "price file's prices and allowances"
                    )
                )

        def apply(db: Db) -> None:
            _record(db, row_id, attempts, "ok", None, outcome.latency_s)
            charged = price if price is not None else quote
            self.ledger.settle(db, Settlement(row_id, charged, fields, hold))

        def committed(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                self.counts[1] += 1
                self.on_event(RequestFinished(request.custom_id, "ok", price or 0))

        posted = self.writer.post(apply)
        posted.add_done_callback(committed)
        return posted

    async def _finish(
        self,
        row_id: int,
        request: ChatRequest,
        state: str,
        exc: ProviderError | None,
        attempts: int,
        note: str | None,
    ) -> None:
        fields = {
            "attempts": attempts,
            "error_type": exc.error_type if exc else None,
            "error_message": " — ".join(x for x in (note, str(exc) if exc else None) if x) or None,
        }
        outcome = {"possibly_billed": "unknown", "failed": "fatal", "pending": "fatal"}[state]

        def apply(db: Db) -> None:
            if exc is not None:
                _record(db, row_id, attempts, outcome, exc, None)
            if state == "possibly_billed":
                self.ledger.mark_possibly_billed(db, row_id, fields)
            else:
                self.ledger.release(db, row_id, state=state, fields=fields)

        with anyio.CancelScope(shield=True):
            await self.writer.submit(apply)
        if state == "failed":
            self.counts[2] += 1
        if state != "pending":
            self.on_event(RequestFinished(request.custom_id, state, 0))


class _TakenOver(Exception):
    """A request between attempts was taken over (its worker was taken for gone)."""


def still_mine(db: Db, row_id: int, state: str, worker: str) -> bool:
    """Whether the request is still in `state` and this worker's (the others take a lapsed worker's
    requests over: its reserved and pending ones go back to the pool, those in flight are possibly
    billed)."""
    row = db.conn.execute("SELECT state, worker_id FROM requests WHERE id = ?", (row_id,)).fetchone()
    return row is not None and row[0] == state and row[1] == worker


def _record(
    db: Db, row_id: int, number: int, outcome: str, exc: ProviderError | None, latency: float | None
) -> None:
    error = str(exc)[:500] if exc else None
    db.attempt(row_id, number, outcome, exc.status if exc else 200, error, latency)


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


__all__ = ["Engine"]
