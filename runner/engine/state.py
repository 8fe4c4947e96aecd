"""The state a worker's engine shares between its parts, declared once (set by Engine.__init__)."""

from __future__ import annotations

from collections import deque

import anyio

from runner.core.config import RunConfig
from runner.core.errors import LedgerUnavailable, printable
from runner.core.events import Listener, Notice
from runner.core.money import format_usd
from runner.engine.plan import Plan
from runner.ledger import KeptAnswer, Ledger, Writer
from runner.providers.base import Provider
from runner.providers.limits import AdaptiveLimit, Limits


class EngineState:
    provider: Provider
    scope: str
    ledger: Ledger
    plan: Plan
    config: RunConfig
    on_event: Listener
    writer: Writer
    limits: Limits
    limit: AdaptiveLimit  # the concurrency window (this worker's share of the run's)
    worker: str
    counts: list[int]  # this worker's requests sent, ok, failed
    stopping: anyio.Event
    aborted: bool
    _work: anyio.CancelScope
    reason: str | None
    state: str
    _taken: set[int]  # rows handed to a worker task whose request has not finished
    over_quote: int  # requests charged above their hold (a price table too low)
    _sent_at: dict[int, float]  # requests in flight: when their attempt went out
    _latencies: deque[float]  # recent calls' times, for "stalled"
    ledger_gone: str | None  # the ledger's file was deleted or replaced under the run
    unsaved: list[KeptAnswer]  # answers paid for whose settlement could not be committed

    def stop(self, state: str, reason: str) -> None:
        if not self.stopping.is_set():
            self.state, self.reason = state, reason
            self.on_event(Notice(reason))
            self.stopping.set()

    def charged_above(self, custom_id: str, price: int, hold: int, check: str) -> None:
        """A charge above what its request held: counted, and said once (`check`: what to look at)."""
        self.over_quote += 1
        if self.over_quote == 1:
            self.on_event(
                Notice(
                    f"{printable(custom_id)} was charged {format_usd(price)}, above its hold of "
                    f"{format_usd(hold)}: the excess counts against the budget; check {check}"
                )
            )

    def ledger_failed(self, error: LedgerUnavailable) -> None:
        """A write the ledger refused (a full disk, a file made read-only): nothing more is launched,
        and what is in flight finishes (its answers are kept: engine.Engine._keep_unsaved)."""
        self.stop("stopped", f"{error}; nothing more was sent, and what was in flight finished")
