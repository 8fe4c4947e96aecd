"""Batch mode's run phase: the run's pending lines sent as provider batches, held to the budget at
batch prices, each step recorded in the ledger before the next, polled with backoff, settled line by
line, and switched to calls when what is left could no longer finish by the deadline.

A part's life: `held` (its lines reserved, in one transaction) → `uploaded` (the provider's file id)
→ `submitted` (the batch id) → `settled` (every line charged, failed, or back to pending). A process
killed between two steps leaves the step it was at: a part not yet `submitted` is looked for at the
provider by the metadata its batch carries (the run and the part) before a batch is made of it."""

from __future__ import annotations

import hashlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from runner.core.config import RunConfig
from runner.core.errors import OutcomeUnknown, ProviderError, RetryableError, printable
from runner.core.events import BatchStatus, Listener, Notice, Phase, RequestFinished
from runner.core.jobs import JobChunks
from runner.core.models import ChatRequest
from runner.core.money import format_usd, to_nanos
from runner.core.result import result_values
from runner.engine.plan import Plan, changed
from runner.engine.requote import call_quotes
from runner.engine.state import EngineState
from runner.ledger import Hold, Ledger, PartView, Settlement
from runner.providers.batch import MAX_BYTES, BatchClient, BatchState, answered, batch_line, line_error
from runner.providers.connection import Connection

DEFAULT_SYNC_LATENCY_S = 30.0  # a call's time when the ledger has none of this provider's to go by
SWITCH_MARGIN = 1.5  # what is left must finish as calls with this much time to spare
CHUNK = 500  # job lines read, and output lines settled, at a time
BEAT_S = 5.0  # the worker's sign of life while it waits for batches
EXPIRED = frozenset({"batch_expired", "batch_cancelled"})


@dataclass
class _Buffer:
    """Lines gathered for the next part."""

    rows: list[tuple[int, int]]  # (row id, quote at batch prices)
    data: list[bytes]
    size: int = 0


class BatchRun(EngineState):
    """One worker sending a run's pending lines as batches; `run()` says whether the rest is to go
    as calls (the deadline, or `--mode sync` on a run with batches)."""

    def __init__(
        self, conn: Connection, ledger: Ledger, plan: Plan, config: RunConfig, on_event: Listener
    ) -> None:
        assert conn.batches is not None
        self.client: BatchClient = conn.batches
        self.provider, self.scope = conn.provider, conn.scope
        self.ledger, self.plan, self.config, self.on_event = ledger, plan, config, on_event
        self.stopping = anyio.Event()
        self.state, self.reason = "done", None
        self.aborted = False
        self.ledger_gone = None
        self.counts = [0, 0, 0]
        self.over_quote = 0
        self.poll_s = config.batch_poll_s[0]
        self._beat_at = 0.0
        self._latency: float | None = None  # a call's time, looked up once (runner.ledger recent_latency)

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self, job: Path, *, to_sync: bool = False) -> bool:
        """Send and collect the run's batches until every line is settled; True when the rest is to
        be sent as calls (the deadline, or `to_sync`: the run switches now)."""
        left = await anyio.to_thread.run_sync(self.ledger.unfinished_lines, self.plan.run_id)
        self.on_event(Phase("running", left))
        async with anyio.create_task_group() as tasks:
            if self.config.handle_signals:
                tasks.start_soon(self._watch_signals)
            try:
                switched = await self._loop(job, to_sync=to_sync)
            finally:
                tasks.cancel_scope.cancel()
        return switched

    async def _loop(self, job: Path, *, to_sync: bool) -> bool:
        pending_left = True
        while not self.stopping.is_set():
            await self._beat()
            parts = await anyio.to_thread.run_sync(
                lambda: self.ledger.parts(self.plan.run_id, open_only=True)
            )
            if to_sync or await self._too_late():
                return await self._switch(job, parts)
            for part in parts:
                if part.state in ("held", "uploaded"):
                    await self._submit(job, part, made_now=False)
            if pending_left:
                await self._send_pending(job)
                pending_left = False
                if self.stopping.is_set():
                    break
            open_parts = await self._look()
            if not open_parts and not pending_left:
                if await anyio.to_thread.run_sync(self.ledger.pending_rows, self.plan.run_id):
                    pending_left = True  # lines of an expired or cancelled batch, to send again
                    continue
                return False
            await self._wait()
        return False

    async def _wait(self) -> None:
        with anyio.move_on_after(self.poll_s):
            await self.stopping.wait()
        self.poll_s = min(self.config.batch_poll_s[1], self.poll_s * 1.5)

    async def _beat(self) -> None:
        """The worker's sign of life (the run is not taken for abandoned while batches run)."""
        if time.monotonic() - self._beat_at < BEAT_S:
            return
        self._beat_at = time.monotonic()

        def touch() -> None:
            with self.ledger.transaction() as tx:
                self.ledger.touch_worker(tx, self.plan.run_id, self.plan.owner)

        await anyio.to_thread.run_sync(touch)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.stop(
                    "interrupted",
                    "interrupted: the run's batches keep running at the provider (their lines stay "
                    "held); resuming the run collects them",
                )
                return

    # ---- sending -------------------------------------------------------------------------------

    async def _send_pending(self, job: Path) -> None:
        """The run's pending lines, in file order, made into parts and submitted (until the budget
        takes no more: the run stops)."""
        buffer = _Buffer([], [])
        lines = JobChunks(job, CHUNK, self.config.max_line_bytes)
        try:
            index = 0
            while (chunk := await anyio.to_thread.run_sync(lines.take, index)) is not None:
                index += 1
                for request, quote, row_id in await self._pending_of(job, chunk):
                    line = batch_line(request)
                    if buffer.rows and (
                        len(buffer.rows) >= self.config.batch_size or buffer.size + len(line) > MAX_BYTES
                    ):
                        if not await self._make_part(job, buffer):
                            return
                        buffer = _Buffer([], [])
                    buffer.rows.append((row_id, quote))
                    buffer.data.append(line)
                    buffer.size += len(line)
        finally:
            lines.close()
        if buffer.rows:
            await self._make_part(job, buffer)

    async def _pending_of(self, job: Path, chunk: list[ChatRequest]) -> list[tuple[ChatRequest, int, int]]:
        run_id = self.plan.run_id

        def read() -> list[tuple[ChatRequest, int, int]]:
            rows = self.ledger.request_rows(run_id, [r.custom_id for r in chunk])
            found = []
            for request in chunk:
                row = rows.get(request.custom_id)
                if row is None or row.sha256 != request.sha256:
                    raise changed(job, request, run_id, "is new" if row is None else "changed")
                if row.state == "pending" and row.quote_nanos is not None:
                    found.append((request, row.quote_nanos, row.id))
            return found

        return await anyio.to_thread.run_sync(read)

    async def _make_part(self, job: Path, buffer: _Buffer) -> bool:
        """Hold the buffer's lines (as many as the budget takes) as a new part, then submit it;
        False when the budget could not take them all (the run stops)."""
        content = b"".join(buffer.data)
        digest = hashlib.sha256(content).hexdigest()
        made = await anyio.to_thread.run_sync(
            lambda: self.ledger.hold_part(
                self.plan.run_id, self.plan.budget_id, buffer.rows, digest, len(content)
            )
        )
        if made is None:
            self.stop("stopped", "budget reached: the next batch's lines did not fit")
            return False
        part, held = made
        self.counts[0] += len(held)
        if len(held) < len(buffer.rows):  # the budget took some: the part is made of those alone
            self.stop("stopped", f"budget reached: batch {part.number} holds {len(held)} of its lines")
            await self._submit(job, part, made_now=True)
            return False
        await self._submit(job, part, made_now=True, content=content)
        return True

    async def _part_content(self, job: Path, part: PartView) -> bytes:
        """A part's input file made again from the job (after a crash, or for a part cut short)."""
        lines = JobChunks(job, CHUNK, self.config.max_line_bytes)
        data: list[bytes] = []
        try:
            index = 0
            while (chunk := await anyio.to_thread.run_sync(lines.take, index)) is not None:
                index += 1
                rows = await anyio.to_thread.run_sync(
                    self.ledger.part_rows, part.id, [r.custom_id for r in chunk]
                )
                data += [batch_line(r) for r in chunk if r.custom_id in rows]
        finally:
            lines.close()
        return b"".join(data)

    async def _submit(
        self, job: Path, part: PartView, *, made_now: bool, content: bytes | None = None
    ) -> bool:
        """Upload a held part and make its batch, each step recorded; a part a killed process left
        is first looked for at the provider (its batch may exist, unrecorded)."""
        metadata = {"runner_run": self.plan.run_id, "runner_part": str(part.number)}
        try:
            if not made_now and await self._found(part, metadata):
                return True
            file_id = part.file_id
            if file_id is None:
                if content is None or hashlib.sha256(content).hexdigest() != part.digest:
                    content = await self._part_content(job, part)
                file_id = await self.client.upload(content, f"runner-{self.plan.run_id}-{part.number}.jsonl")
                await self._update(part, file_id=file_id, state="uploaded")
            try:
                made = await self.client.create(file_id, metadata)
            except (OutcomeUnknown, RetryableError):  # it may have been made: look before making it again
                if await self._found(part, metadata):
                    return True
                made = await self.client.create(file_id, metadata)
        except ProviderError as exc:
            self.stop("stopped", f"batch {part.number} could not be submitted: {exc}")
            return False
        await self._update(part, batch_id=made.id, state="submitted", status=made.status)
        self.on_event(Notice(f"batch {part.number} submitted: {made.id} ({part.lines} lines)"))
        return True

    async def _found(self, part: PartView, metadata: dict[str, str]) -> bool:
        """Whether the provider has the part's batch already (made, not recorded): recorded now."""
        since = part.created_at.timestamp() - 600 if part.created_at else 0.0
        found = await self.client.find(metadata, since)
        if found is None:
            return False
        await self._update(part, batch_id=found.id, state="submitted", status=found.status)
        self.on_event(Notice(f"batch {part.number} was made before the process stopped: {found.id}"))
        return True

    async def _update(self, part: PartView, **values: Any) -> None:
        await anyio.to_thread.run_sync(lambda: self.ledger.update_part(part.id, **values))

    # ---- collecting ----------------------------------------------------------------------------

    async def _look(self) -> int:
        """Look at each submitted batch; settle those that ended. The number still open."""
        still = 0
        counts = [0, 0, 0]
        for part in await anyio.to_thread.run_sync(
            lambda: self.ledger.parts(self.plan.run_id, open_only=True)
        ):
            if part.state != "submitted" or part.batch_id is None:
                still += part.state != "settled"
                continue
            try:
                state = await self.client.retrieve(part.batch_id)
            except RetryableError as exc:
                self.on_event(Notice(f"batch {part.number}: could not be looked at ({exc}); trying again"))
                still += 1
                continue
            except ProviderError as exc:  # not found, or refused: looking again will not help
                self.stop(
                    "stopped",
                    f"batch {part.number} ({part.batch_id}) cannot be looked at: {exc}. Its lines stay "
                    "held; was it made with another API key or endpoint? Resume the run with that one",
                )
                return still + 1
            if (state.status, state.completed, state.failed) != (part.status, part.completed, part.failed):
                self.poll_s = self.config.batch_poll_s[0]  # it moves: look again soon
                await self._update(part, status=state.status, completed=state.completed, failed=state.failed)
            if state.ended:
                try:
                    await self._settle(part, state)
                except (
                    ProviderError
                ) as exc:  # its files could not be read: settled lines stay, the rest next look
                    self.on_event(
                        Notice(f"batch {part.number}: its output could not be read ({exc}); trying again")
                    )
                    still += 1
            else:
                still += 1
                counts[0] += 1
                counts[1] += state.completed
                counts[2] += state.failed
        self.on_event(BatchStatus(still, counts[1], counts[2], self.poll_s, self.config.deadline))
        return still

    async def _settle(self, part: PartView, state: BatchState) -> None:
        """Every line of an ended batch: answered lines charged at batch prices, failed lines failed,
        lines it did not reach (expired, cancelled) back to pending, to go again."""
        latency = max(0.0, time.time() - (part.created_at.timestamp() if part.created_at else time.time()))
        for file_id in (state.output_file_id, state.error_file_id):
            if file_id is None:
                continue
            chunk: list[dict[str, Any]] = []
            async for line in self.client.lines(file_id):
                chunk.append(line)
                if len(chunk) >= CHUNK:
                    await self._settle_chunk(part, chunk, latency)
                    chunk = []
            if chunk:
                await self._settle_chunk(part, chunk, latency)
        left = await anyio.to_thread.run_sync(self.ledger.batched_left, part.id)
        if left:
            if state.status in ("expired", "cancelled"):
                fields: dict[str, Any] = {}
                rows = [(row_id, "pending", fields) for row_id in left]
            else:
                why = "the batch failed" if state.status == "failed" else "no line in the batch's output"
                fields = {"error_type": f"batch_{state.status}", "error_message": f"{why} ({state.id})"}
                rows = [(row_id, "failed", fields) for row_id in left]
                self.counts[2] += len(rows)
            await anyio.to_thread.run_sync(self.ledger.release_lines, rows)
        await self._update(part, state="settled", status=state.status)
        self.on_event(
            Notice(
                f"batch {part.number} {state.status}: {state.completed} completed, {state.failed} failed"
                + (
                    f", {len(left)} to send again"
                    if left and state.status in ("expired", "cancelled")
                    else ""
                )
            )
        )

    async def _settle_chunk(self, part: PartView, lines: list[dict[str, Any]], latency: float) -> None:
        ids = [str(line.get("custom_id")) for line in lines]
        rows = await anyio.to_thread.run_sync(self.ledger.part_rows, part.id, ids)
        settlements: list[Settlement] = []
        attempts: list[tuple[int, float]] = []
        releases: list[tuple[int, str, dict[str, Any]]] = []
        for line, custom_id in zip(lines, ids, strict=True):
            row = rows.get(custom_id)
            if row is None:  # settled already (read again after a crash), or not this part's
                continue
            row_id, model, hold, tried = row
            if answered(line):
                outcome = self.client.outcome(model, line["response"], latency)
                price = None if outcome.price is None else to_nanos(outcome.price)
                if price is not None and price > hold:
                    self.charged_above(custom_id, price, hold, "the batch prices")
                fields = {
                    "attempts": tried + 1,
                    **result_values(outcome),
                    "error_type": None,
                    "error_message": None,
                }
                charged = price if price is not None else hold
                settlements.append(
                    Settlement(row_id, charged, fields, Hold(hold, self.plan.budget_id, self.plan.run_id))
                )
                attempts.append((tried + 1, latency))
                self.counts[1] += 1
                self.on_event(RequestFinished(custom_id, "ok", charged))
                continue
            kind, message = line_error(line)
            if kind in EXPIRED:
                releases.append((row_id, "pending", {}))
            else:
                fields = {
                    "attempts": tried + 1,
                    "error_type": kind,
                    "error_message": printable(message)[:500],
                }
                releases.append((row_id, "failed", fields))
                self.counts[2] += 1
                self.on_event(RequestFinished(custom_id, "failed", 0))
        if settlements:
            await anyio.to_thread.run_sync(self.ledger.settle_lines, settlements, attempts)
        if releases:
            await anyio.to_thread.run_sync(self.ledger.release_lines, releases)

    # ---- the deadline --------------------------------------------------------------------------

    async def _too_late(self) -> bool:
        """Whether what is left, sent as calls from now, would only just finish by the deadline."""
        deadline = self.config.deadline
        if deadline is None:
            return False
        left = await anyio.to_thread.run_sync(self.ledger.unfinished_lines, self.plan.run_id)
        if not left:
            return False
        latency = self.config.sync_latency_s or self._latency
        if latency is None:  # the ledger's recent calls on this provider, else a call of half a minute
            seen = await anyio.to_thread.run_sync(self.ledger.recent_latency, self.scope)
            latency = self._latency = seen if seen is not None else DEFAULT_SYNC_LATENCY_S
        waves = math.ceil(left / self.config.concurrency)
        seconds = waves * latency
        if self.config.rpm:
            seconds = max(seconds, left / (self.config.rpm / 60))
        return time.time() + seconds * SWITCH_MARGIN + self.poll_s >= deadline

    async def _switch(self, job: Path, parts: list[PartView]) -> bool:
        """Cancel the open batches and send what they do not deliver as calls, once the budget is
        seen to hold the difference between batch and call prices; True when it does."""
        try:
            quotes = await call_quotes(self.provider, self.ledger, self.plan.run_id, job, self.config)
        except ProviderError as exc:  # a dry run refused: nothing is cancelled, the batches run on
            self.stop(
                "stopped", f"the deadline needs the rest sent as calls, which could not be quoted: {exc}"
            )
            return False
        extra = sum(quotes.values()) - await anyio.to_thread.run_sync(
            self.ledger.held_unfinished, self.plan.run_id
        )
        view = await anyio.to_thread.run_sync(self.ledger.budget_by_id, self.plan.budget_id)
        if extra > view.remaining_nanos:
            room = format_usd(view.remaining_nanos)
            self.stop(
                "stopped",
                f"the deadline needs the run's {len(quotes)} unfinished line(s) sent as calls, which "
                f"costs {format_usd(extra)} more than their batch holds; the budget has {room} left, so "
                "nothing was sent as calls (the batches keep running: resume the run to collect them, or "
                "raise the budget)",
            )
            return False
        self.on_event(
            Notice(
                f"switching to calls: what is left ({len(quotes)} lines) would not finish by the deadline as "
                f"batches; their batches are cancelled and what they delivered is settled"
            )
        )
        for part in parts:
            await self._update(part, cancel=True)
            if part.state in ("held", "uploaded") and not await self._found(
                part, {"runner_run": self.plan.run_id, "runner_part": str(part.number)}
            ):
                left = await anyio.to_thread.run_sync(self.ledger.batched_left, part.id)
                await anyio.to_thread.run_sync(self.ledger.release_lines, [(r, "pending", {}) for r in left])
                await self._update(part, state="settled", status="not_submitted")
        await self._cancel_and_collect()
        pending = await anyio.to_thread.run_sync(self.ledger.pending_rows, self.plan.run_id)
        requoted = [(row_id, quotes[cid]) for cid, (row_id, _, _) in pending.items() if cid in quotes]
        await anyio.to_thread.run_sync(self.ledger.requote, self.plan.run_id, requoted)
        await anyio.to_thread.run_sync(self.ledger.set_run_mode, self.plan.run_id, "sync")
        return True

    async def _cancel_and_collect(self) -> None:
        """Cancel every submitted batch of the run and settle what each delivered."""
        run_id = self.plan.run_id
        for part in await anyio.to_thread.run_sync(lambda: self.ledger.parts(run_id, open_only=True)):
            if part.batch_id is not None:
                try:
                    await self.client.cancel(part.batch_id)
                except ProviderError as exc:  # ended meanwhile, most likely: collected below
                    self.on_event(Notice(f"batch {part.number}: cancel refused ({exc})"))
        self.poll_s = self.config.batch_poll_s[0]
        while await self._look():
            with anyio.move_on_after(self.poll_s):
                await self.stopping.wait()
            if self.stopping.is_set():
                return


__all__ = ["BatchRun"]
