"""A worker's membership in a run: its sign of life (with the budget's funds shown), its share of
the run's concurrency, the run-wide limits kept in the ledger, and taking over workers that stopped."""

from __future__ import annotations

import statistics
import time

import anyio

from runner.core.errors import LedgerUnavailable
from runner.core.events import Funds, Notice
from runner.engine.state import EngineState
from runner.ledger import (
    WORKER_STALE_S,
)

FUNDS_EVERY_S = 1.0  # the funds shown, and the worker's sign of life with its counts
TAKE_OVER_EVERY_S = 5.0  # how often a worker looks for the run's lapsed workers
STALL_FACTOR = 5.0  # in flight this many times the median call: shown as stalled
STALL_MIN_S = 10.0


class Membership(EngineState):
    async def _take_units(
        self, name: str, per_second: float, capacity: int, want: int, start_empty: bool
    ) -> tuple[int, float]:
        """Units of one of the run's shared limits, from the ledger (`workers.take_units`)."""
        ledger, run_id = self.ledger, self.plan.run_id
        return await self.writer.submit(
            lambda db: ledger.take_units(
                db, run_id, name, per_second, capacity, want, start_empty=start_empty
            )
        )

    async def _beat(self) -> None:
        """The worker's sign of life, with its counts; its share of the run's concurrency back."""
        run_id, worker, counts = self.plan.run_id, self.worker, self.counts[:]
        concurrency, in_flight = self.config.concurrency, self.limit.in_flight
        beat = await self.writer.submit(
            lambda db: self.ledger.heartbeat(db, run_id, worker, counts, concurrency, in_flight)
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
        for lapsed in await self.writer.submit(lambda db: self.ledger.take_over_lapsed(db, run_id, worker)):
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
            try:
                await self._beat()
                if time.monotonic() - last_look >= TAKE_OVER_EVERY_S:
                    last_look = time.monotonic()
                    await self._take_over()
            except LedgerUnavailable as exc:  # what is in flight finishes; its answers are kept
                self.ledger_failed(exc)
            await anyio.sleep(FUNDS_EVERY_S)

    def _stalled(self) -> int:
        """Requests in flight STALL_FACTOR times longer than the median call (and over 10 s)."""
        if len(self._latencies) < 20:
            return 0
        limit = max(STALL_MIN_S, STALL_FACTOR * statistics.median(self._latencies))
        now = time.monotonic()
        return sum(now - sent > limit for sent in list(self._sent_at.values()))
