"""One request's life: paced, reserved and marked `sending` in one commit, sent with retries, then
settled (the charge with the response), released, or kept as possibly billed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio

from runner.core.errors import (
    LedgerUnavailable,
    OutcomeUnknown,
    ProviderError,
    RequestFatalError,
    RetryableError,
    RunFatalError,
)
from runner.core.events import RequestFinished, Retrying
from runner.core.models import ChatRequest, Outcome
from runner.core.money import to_nanos
from runner.core.result import result_values
from runner.engine.state import EngineState
from runner.ledger import (
    CLIENT_REQUEST_ID,
    IDEMPOTENCY_KEY,
    Hold,
    KeptAnswer,
    Settlement,
    client_request_id,
)
from runner.ledger import Tx as Db
from runner.providers.retry import first_wait, retrying


class _TakenOver(Exception):
    """A request between attempts was taken over (its worker was taken for gone)."""


class Requests(EngineState):
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
                # the requests charged above their holds are counted when the run ends (app.run._ended):
                # those still in flight may add to them
                reason = "budget reached: the next reservation did not fit"
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
                if not self.ledger.still_mine(db, row_id, "sending", worker):
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
            await self.writer.submit(
                lambda db: self.ledger.record_attempt(db, row_id, number, "retry", error, latency)
            )
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
        price = None if outcome.price is None else to_nanos(outcome.price)
        fields: dict[str, Any] = {
            "attempts": attempts,
            **result_values(outcome),
            "error_type": None if price is not None else "price_unknown",
            "error_message": None if price is not None else "no price reported; charged the quote",
        }

        if price is not None and price > quote:
            self.charged_above(request.custom_id, price, quote, "the price file's prices and allowances")

        charged = price if price is not None else quote
        kept = KeptAnswer(Settlement(row_id, charged, fields, hold), attempts, outcome.latency_s)

        def apply(db: Db) -> None:
            self.ledger.record_attempt(db, row_id, attempts, "ok", None, outcome.latency_s)
            self.ledger.settle(db, kept.settlement)

        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def committed(future: asyncio.Future[None]) -> None:
            error = None if future.cancelled() else future.exception()
            if future.cancelled():
                settled.cancel()
            elif error is None:
                self.counts[1] += 1
                self.on_event(RequestFinished(request.custom_id, "ok", price or 0))
                settled.set_result(None)
            elif isinstance(error, LedgerUnavailable):  # paid for: the answer is never dropped
                self.unsaved.append(kept)
                self.ledger_failed(error)
                settled.set_result(None)
            else:
                settled.set_exception(error)

        self.writer.post(apply).add_done_callback(committed)
        return settled

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
                self.ledger.record_attempt(db, row_id, attempts, outcome, exc, None)
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
