"""The progress line: phase, counts, rate, money held and spent, stalls; rich, on standard error."""

from __future__ import annotations

import time
from collections import deque

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from runner.cli.console import err
from runner.core.events import BatchStatus, Event, Funds, Notice, Phase, Quoted, RequestFinished
from runner.core.money import format_usd


class Progress:
    """Rich progress on a terminal; a plain line every few seconds otherwise (logs, CI, pipes)."""

    LINE_EVERY_S = 5.0
    BAR_EVERY_S = 0.1

    NARROW = 110  # below this many columns the line keeps the essentials: done/total, failed, $, ETA
    RATE_WINDOW_S = 60.0  # rate and ETA over the last minute, not the whole run's average

    def __init__(self, label: str, total: int, console: Console | None = None) -> None:
        self.console = console or err
        self.bar: RichProgress | None = None
        self.narrow = self.console.width < self.NARROW
        self.samples: deque[tuple[float, int]] = deque()
        if self.console.is_terminal:
            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=10 if self.narrow else 30),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.bar.add_task(label, total=total, info="")
        self.funds: Funds | None = None
        self.batches: BatchStatus | None = None  # a batch run's last look at its batches
        self._begin(label, total)

    def _begin(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.done = self.failed = self.spent = 0
        self.started = time.monotonic()
        self.samples.clear()
        self.samples.append((self.started, 0))
        self.last_line = self.started
        if self.bar:
            self.bar.reset(self.task, total=total, description=label, info="")

    def __enter__(self) -> Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def __call__(self, event: Event) -> None:
        if isinstance(event, Notice):
            self.console.print(event.message, markup=False, highlight=False)
            return
        if isinstance(event, Phase):
            self._begin(event.name, event.total)
        elif isinstance(event, Funds):
            self.funds = event
        elif isinstance(event, BatchStatus):
            self.batches = event
        elif isinstance(event, Quoted):
            self.done += 1
        elif isinstance(event, RequestFinished):
            self.done += 1
            self.failed += event.state != "ok"
            self.spent += event.price_nanos
        else:
            return
        self._show()

    def _sample(self, now: float) -> None:
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.RATE_WINDOW_S:
            self.samples.popleft()  # one sample older than the window stays: the window's start

    def rate(self, now: float) -> float:
        """Requests a second over the last RATE_WINDOW_S (the run's average until then)."""
        then, done_then = self.samples[0] if self.samples else (self.started, 0)
        return (self.done - done_then) / max(1e-6, now - then)

    def status(self, now: float) -> str:
        elapsed = max(1e-6, now - self.started)
        rate = self.rate(now)
        parts = [f"{self.failed} failed"]
        stalled = self.funds.stalled if self.funds is not None else 0
        if stalled:
            parts.append(f"{stalled} stalled")
        if self.label == "running":
            parts.append(f"{format_usd(self.spent)} spent")
        if self.batches is not None and self.batches.open:
            parts.append(self._batches(self.batches))
        if self.narrow:
            return " · ".join(parts)
        parts.insert(1, f"{rate:.1f}/s" if rate < 10 else f"{rate:,.0f}/s")  # a slow server: 0.4/s, not 0/s
        if self.label == "running":
            per_minute = self.spent * 60_000 // max(1, round(elapsed * 1000))  # integer nano-USD
            parts.append(f"{format_usd(per_minute)}/min")
            if self.funds is not None:
                parts.append(f"{format_usd(self.funds.reserved_nanos)} reserved")
                parts.append(f"{format_usd(self.funds.remaining_nanos)} left in the budget")
        return " · ".join(parts)

    @staticmethod
    def _batches(b: BatchStatus) -> str:
        """The batches still open at the provider, their counts, the next look, the deadline."""
        text = f"{b.open} batch(es) open: {b.completed:,} done, {b.failed:,} failed"
        text += f" · next look {b.next_look_s:.0f} s"
        if b.deadline is not None:
            text += f" · deadline {time.strftime('%H:%M', time.localtime(b.deadline))}"
        return text

    def _show(self) -> None:
        now = time.monotonic()
        if now - self.samples[-1][0] >= 1.0:
            self._sample(now)
        if self.bar:
            # the bar is drawn ten times a second: updating it per request would cost more than the request
            if now - self.last_line >= self.BAR_EVERY_S or self.done >= self.total:
                self.last_line = now
                self.bar.update(self.task, completed=self.done, info=self.status(now))
        elif now - self.last_line >= self.LINE_EVERY_S:
            self.last_line = now
            status = self.status(now)
            rate, left = self.rate(now), self.total - self.done
            eta = f" · ETA {left / rate:,.0f} s" if rate and left > 0 else ""
            self.console.print(f"{self.label}: {self.done}/{self.total} · {status}{eta}", highlight=False)
