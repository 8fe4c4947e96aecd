"""Stopping a worker: a stop with its reason (budget, deadline, a fatal error), Ctrl-C / SIGTERM
(drain, then abort after the grace period or a second interrupt), and the deadline."""

from __future__ import annotations

import signal
import time

import anyio
from anyio.abc import TaskGroup

from runner.core.events import Notice
from runner.engine.state import EngineState


class Stopping(EngineState):
    async def _stop_at_deadline(self, deadline: float) -> None:
        await anyio.sleep(max(0.0, deadline - time.time()))
        when = time.strftime("%H:%M:%S", time.localtime(deadline))
        self.stop("stopped", f"deadline {when} reached: nothing more is launched, what is in flight finishes")

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
