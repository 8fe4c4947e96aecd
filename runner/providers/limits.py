"""Concurrency and rate limits: an AIMD concurrency window and RPM/TPM token buckets."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from decimal import Decimal

import anyio

from runner.core import schema
from runner.core.config import RunConfig
from runner.core.models import ChatRequest
from runner.core.money import to_nanos


class AdaptiveLimit:
    """A concurrency window, as TCP's: halved once per window of requests that were in flight
    together when a 429 comes back (the rest of that burst's 429s say nothing new), and grown back
    by one slot per window of successes."""

    def __init__(self, maximum: int, minimum: int = 1) -> None:
        self.maximum = maximum
        self.minimum = minimum
        self.current = float(maximum)
        self.in_flight = 0
        self.cut_at = float("-inf")  # when the window was last halved
        self._waiting: deque[anyio.Event] = deque()  # first come, first served

    async def acquire(self) -> None:
        """Take a slot, in the order asked: a pipeline's earliest requests are not overtaken by
        later ones (one event loop, no lock needed)."""
        if self.in_flight < int(self.current) and not self._waiting:
            self.in_flight += 1
            return
        granted = anyio.Event()
        self._waiting.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():  # the slot came with the cancellation: hand it on
                self.release()
            else:
                self._waiting.remove(granted)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.in_flight < int(self.current):
            self.in_flight += 1
            self._waiting.popleft().set()

    def set_maximum(self, maximum: int) -> None:
        """The window's ceiling changes (a worker's share of the run's concurrency, as workers join
        and leave): lowered at once; raised by as much as the ceiling rose (a window cut by 429s
        stays cut by as much)."""
        if maximum == self.maximum:
            return
        grown = max(0, maximum - self.maximum)
        self.maximum = maximum
        self.current = min(float(maximum), self.current + grown)
        self._grant()

    def on_success(self) -> None:
        self.current = min(self.maximum, self.current + 1 / max(1.0, self.current))
        self._grant()

    def on_rate_limited(self, sent_at: float) -> None:
        """A 429 for a request sent at `sent_at` (time.monotonic()): a request sent before the last
        cut was in flight with the one that caused it, and cuts nothing more."""
        if sent_at <= self.cut_at:
            return
        self.current = max(min(self.minimum, self.maximum), self.current / 2)
        self.cut_at = time.monotonic()


class TokenBucket:
    """`rate` units per minute, bursting up to `burst`; `take` waits until the units are there."""

    def __init__(self, per_minute: float, burst: float | None = None, *, start: float | None = None) -> None:
        self.rate = per_minute / 60.0
        self.capacity = burst if burst is not None else max(1.0, self.rate)  # about 1 s of burst
        self.level = self.capacity if start is None else min(start, self.capacity)
        self.stamp = time.monotonic()
        self._lock = anyio.Lock()

    async def take(self, amount: float = 1.0) -> None:
        amount = min(amount, self.capacity)
        async with self._lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.level >= amount:
                    self.level -= amount
                    return
                await anyio.sleep((amount - self.level) / self.rate)


# fetch(name, per_second, capacity, want, start_empty) -> (units granted, seconds to wait when none)
Fetch = Callable[[str, float, int, int, bool], Awaitable[tuple[int, float]]]
SHARED_BATCH_S = 0.1  # a worker takes this long's worth of a shared bucket at a time


class SharedBucket:
    """A token bucket kept in the ledger for a whole run (several workers, one rate): units are
    fetched from it a tenth of a second's worth at a time and spent here."""

    def __init__(
        self,
        name: str,
        per_minute: float,
        fetch: Fetch,
        burst: float | None = None,
        *,
        start_empty: bool = False,
    ) -> None:
        self.name, self.fetch, self.start_empty = name, fetch, start_empty
        self.rate = per_minute / 60.0
        self.capacity = max(1, int(burst if burst is not None else self.rate))
        self.batch = max(1, int(self.rate * SHARED_BATCH_S))
        self.local = 0
        self._lock = anyio.Lock()

    async def take(self, amount: float = 1.0) -> None:
        need = max(1, min(math.ceil(amount), self.capacity))
        async with self._lock:
            while self.local < need:
                want = min(self.capacity, max(self.batch, need - self.local))
                granted, wait = await self.fetch(self.name, self.rate, self.capacity, want, self.start_empty)
                self.local += granted
                if self.local < need:
                    await anyio.sleep(wait if not granted else (need - self.local) / self.rate)
            self.local -= need


RPM_PACE = 0.995  # share of --rpm actually used: timing jitter either side cannot push a span over


class Limits:
    """Every limit a run's calls obey, dry runs and calls alike: the concurrency window and the
    --rpm / --tpm pacing. One object serves the pre-flight and the run phase of a command."""

    def __init__(
        self,
        concurrency: int,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        usd_per_hour: Decimal | None = None,
    ) -> None:
        self.window = AdaptiveLimit(concurrency)
        # money per minute, in nano-USD, with a minute's worth of burst
        per_minute = float(to_nanos(usd_per_hour) / 60) if usd_per_hour is not None else None
        self.spending: TokenBucket | SharedBucket | None = (
            TokenBucket(per_minute, burst=per_minute) if per_minute else None
        )
        # RPM starts empty (no burst at the start), so no 60 s span of the run exceeds the limit
        self.rpm: TokenBucket | SharedBucket | None = TokenBucket(rpm * RPM_PACE, start=0) if rpm else None
        self.tpm: TokenBucket | SharedBucket | None = TokenBucket(tpm, burst=tpm / 60 * 5) if tpm else None

    @classmethod
    def of(cls, config: RunConfig) -> Limits:
        """The limits a run's configuration sets."""
        return cls(config.concurrency, config.rpm, config.tpm, usd_per_hour=config.max_usd_per_hour)

    def share(self, fetch: Fetch) -> None:
        """From now on --rpm, --tpm and --max-usd-per-hour hold for the whole run, across workers:
        their buckets are kept in the ledger (`fetch`)."""
        if self.rpm is not None:
            self.rpm = SharedBucket("rpm", self.rpm.rate * 60, fetch, start_empty=True)
        if self.tpm is not None:
            self.tpm = SharedBucket("tpm", self.tpm.rate * 60, fetch, burst=self.tpm.capacity)
        if self.spending is not None:
            self.spending = SharedBucket("usd", self.spending.rate * 60, fetch, burst=self.spending.capacity)

    async def spend(self, nanos: int) -> None:
        """Wait until `nanos` more can be held under --max-usd-per-hour."""
        if self.spending is not None:
            await self.spending.take(nanos)

    @property
    def rated(self) -> bool:
        """Whether --rpm or --tpm is set (else `pace` has nothing to wait for)."""
        return self.rpm is not None or self.tpm is not None

    async def pace(self, request: ChatRequest) -> None:
        """Wait for the RPM and TPM buckets: one request (its tokens counted only under --tpm)."""
        if self.rpm is not None:
            await self.rpm.take()
        if self.tpm is not None:
            await self.tpm.take(request_tokens(request))


def request_tokens(request: ChatRequest) -> int:
    """What --tpm counts for a request: its prompt estimate plus the most its answer can take."""
    return schema.estimate_prompt_tokens(request.body) + schema.max_output_tokens(request.body)
