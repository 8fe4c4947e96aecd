"""The dry-run phase: a quote for every request, asked once and kept in the ledger."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import islice

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from runner.app.expect import Expectation
from runner.core.config import CACHE_MODES, RetryPolicy
from runner.core.errors import ConfigError, ProviderError, RetryableError, RunFatalError
from runner.core.events import Listener, Quoted, Retrying, ignore
from runner.core.models import ChatRequest, Quote
from runner.core.money import from_nanos
from runner.ledger import Ledger, SeenKeys
from runner.providers.base import Provider
from runner.providers.connection import Connection
from runner.providers.limits import Limits
from runner.providers.retry import first_wait, retrying

BATCH = 1000
# a dry run's price is reused this long: a provider's prices change, and a job quoted again next
# week is quoted at next week's prices (a run's rows keep the quotes it was prepared with)
QUOTE_MAX_AGE = timedelta(days=1)
# what is done with each chunk of requests and their quotes (and how each is answered), in file order
OnChunk = Callable[[list[ChatRequest], list[Quote], list["Reuse | None"]], Awaitable[None]]


@dataclass
class ModelQuote:
    requests: int = 0
    nanos: int = 0
    exact: bool = True
    unknown: int = 0
    tokenized: int = 0  # requests whose prompt the server counted (the answer still bounded)
    expected_nanos: int = 0  # what they are expected to cost (runner.app.expect)


@dataclass(frozen=True, slots=True)
class Reuse:
    """A request that is not sent: its answer is an earlier run's (`source`, which cost
    `source_nanos`), or, with no source, that of an identical earlier line of the job."""

    source: int | None
    source_nanos: int = 0


REUSED = Quote(Decimal(0), exact=True, source="cache")  # what a request answered from the ledger costs


@dataclass
class Estimate:
    """Per model: the requests to send and their quotes; apart, those answered from the ledger."""

    per_model: dict[str, ModelQuote] = field(default_factory=lambda: defaultdict(ModelQuote))
    unquoted: list[tuple[str, str]] = field(default_factory=list)  # (custom_id, reason), capped
    unquoted_count: int = 0
    quote_calls: int = 0
    reused: int = 0  # requests answered from the ledger (an earlier run, or an identical line)
    saved_nanos: int = 0  # what they cost (or were quoted) when first asked
    expect: Expectation | None = None  # how the expected cost is worked out (None: not asked for)

    @property
    def total_nanos(self) -> int:
        return sum(m.nanos for m in self.per_model.values())

    @property
    def exact(self) -> bool:
        return all(m.exact for m in self.per_model.values())

    @property
    def expected_nanos(self) -> int:
        return sum(m.expected_nanos for m in self.per_model.values())

    def add(self, request: ChatRequest, quote: Quote, reuse: Reuse | None = None) -> None:
        if reuse is not None:
            self.reused += 1
            self.saved_nanos += reuse.source_nanos if reuse.source is not None else quote.nanos or 0
            return
        entry = self.per_model[request.model]
        entry.requests += 1
        if quote.amount is None:
            entry.unknown += 1
            self.unquoted_count += 1
            if len(self.unquoted) < 100:
                self.unquoted.append((request.custom_id, quote.reason or "no price known"))
            return
        assert quote.nanos is not None
        entry.nanos += quote.nanos
        entry.exact = entry.exact and quote.exact
        entry.tokenized += quote.source == "tokenized"
        entry.expected_nanos += quote.nanos if self.expect is None else self.expect.expected(request, quote)


class Answers:
    """Which requests need not be sent. `reuse`: those answered ok in an earlier run on the same
    provider endpoint, and lines identical to an earlier line of the job (the answer is asked
    once); `refresh`: identical lines only (earlier answers are bought again, and become the ones
    reused); `off`: every line is sent as written."""

    def __init__(self, ledger: Ledger, scope: str, mode: str = "reuse") -> None:
        if mode not in CACHE_MODES:
            msg = f"--cache must be one of {', '.join(CACHE_MODES)} (got '{mode}')"
            raise ConfigError(msg)
        self.ledger, self.scope, self.mode = ledger, scope, mode
        self._seen = SeenKeys()  # the job's answer keys so far: bounded memory at any size

    def decide(self, requests: list[ChatRequest]) -> list[Reuse | None]:
        """For each request (in file order, chunk after chunk): None to send it, or how it is answered."""
        if self.mode == "off":
            return [None] * len(requests)
        keys = [r.answer_key for r in requests]
        hits = self.ledger.reusable_answers(self.scope, keys) if self.mode == "reuse" else {}
        digests = [bytes.fromhex(k[:32]) for k in keys]
        seen = self._seen.which(digests)
        decided: list[Reuse | None] = []
        for key, digest in zip(keys, digests, strict=True):
            if key in hits:
                decided.append(Reuse(*hits[key]))
            elif digest in seen:
                decided.append(Reuse(None))
            else:
                decided.append(None)
            seen.add(digest)
        self._seen.add(digests)
        return decided

    def close(self) -> None:
        self._seen.close()


def cache_key(scope: str, request: ChatRequest) -> str:
    return f"{scope}|{request.model}|{request.sha256}"


def _chunks(items: Iterable[ChatRequest], size: int) -> Iterator[list[ChatRequest]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


async def quote_with_retries(
    provider: Provider, request: ChatRequest, policy: RetryPolicy, on_event: Listener
) -> Quote:
    """A dry run, retried as calls are (`retry.retrying`); a quote that cannot be had is unknown,
    with the reason. A 401 or 402 is raised: it stops the pre-flight."""

    try:
        try:  # the first attempt directly: most dry runs succeed at once
            return await provider.quote(request)
        except RetryableError as exc:
            if policy.attempts <= 1:
                raise

            def retried(attempt: int, wait: float, error: BaseException | None) -> None:
                on_event(Retrying(request.custom_id, attempt, wait, str(error)))

            wait = first_wait(policy, exc)
            retried(1, wait, exc)
            await anyio.sleep(wait)
        async for attempt in retrying(policy, retried, made=1):
            with attempt:
                return await provider.quote(request)
    except RetryableError as exc:
        return Quote(None, exact=False, source="dry_run", reason=f"gave up: {exc}")
    except RunFatalError:
        raise
    except ProviderError as exc:
        return Quote(None, exact=False, source="dry_run", reason=str(exc))
    raise AssertionError  # pragma: no cover - tenacity returns, retries or re-raises


@dataclass
class _Chunk:
    """A chunk of requests whose dry runs are under way; `done` once every one has its quote."""

    requests: list[ChatRequest]
    keys: list[str]
    reuse: list[Reuse | None]
    cached: set[str]
    quotes: dict[str, Quote]
    asked: list[str]
    done: anyio.Event = field(default_factory=anyio.Event)
    left: int = 0


@dataclass(frozen=True)
class Quoting:
    """How a job is quoted: `cache` (see `Answers`; off: every line is quoted as written), how old a
    kept dry-run quote may be (None: any age), and the dry runs' retries."""

    cache: str = "off"
    quote_max_age: timedelta | None = QUOTE_MAX_AGE
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    expect: Expectation | None = None  # the expected cost beside the bound


async def quote_requests(
    requests: Iterable[ChatRequest],
    conn: Connection,
    ledger: Ledger,
    *,
    limits: Limits | int = 32,
    quoting: Quoting | None = None,
    on_event: Listener = ignore,
    on_chunk: OnChunk | None = None,
) -> Estimate:
    """Quote every request (kept quotes younger than `quoting.quote_max_age` reused, identical bodies
    asked once) at the concurrency and pace of `limits`, store new quotes, and total them per model.
    With a cache mode, a request answered in an earlier run needs no dry run, and it and any line
    identical to an earlier one are counted apart.

    The dry runs are a pipeline: chunks are read ahead and their dry runs started while earlier
    chunks finish, so the network is kept busy at the concurrency; `on_chunk` still gets each chunk
    of requests with their quotes in file order, once they are known.
    """
    quoting = quoting or Quoting()
    if isinstance(limits, int):
        if limits < 1:
            msg = f"--concurrency must be 1 or more (got {limits})"
            raise ConfigError(msg)
        limits = Limits(limits)
    estimate = Estimate(expect=quoting.expect)
    reader = _Reader(conn, ledger, quoting)
    asker = _Asker(conn.provider, limits, quoting.policy, on_event, estimate)
    ahead = max(2, -(-2 * limits.window.maximum // BATCH))  # chunks under way: twice the concurrency

    async def start_all(send: MemoryObjectSendStream[_Chunk]) -> None:
        try:
            async with send:
                for part in _chunks(requests, BATCH):
                    chunk, missing = await reader.read(part)
                    asker.add(chunk, missing)
                    await send.send(chunk)  # waits while `ahead` chunks are under way
        finally:
            asker.close()

    try:
        async with anyio.create_task_group() as tg:
            send, receive = anyio.create_memory_object_stream[_Chunk](ahead)
            tg.start_soon(start_all, send)
            for _ in range(limits.window.maximum):
                tg.start_soon(asker.work)
            async with receive:
                async for chunk in receive:
                    await _finish(chunk, reader.kept, estimate, on_event, on_chunk)
    except* RunFatalError as group:  # a 401 or 402 fails every dry run alike: say it once
        first = group.exceptions[0]
        msg = f"the provider refused the dry runs, nothing was sent: {first}"
        raise RunFatalError(msg, status=getattr(first, "status", None)) from None
    finally:
        reader.close()
    return estimate


class _Reader:
    """A chunk's quote keys, what the cache answers of it, and its kept quotes: what is left to ask."""

    def __init__(self, conn: Connection, ledger: Ledger, quoting: Quoting) -> None:
        self.scope = conn.scope
        self.answers = Answers(ledger, conn.scope, quoting.cache) if quoting.cache != "off" else None
        # the ledger keeps the provider's dry runs; quotes from a price table are made again each
        # time (cheaply): kept, they would outlive an edit of the price file
        self.kept = ledger if conn.provider.dry_runs else None
        age = quoting.quote_max_age
        self.since = None if age is None else datetime.now(UTC) - age

    async def read(self, part: list[ChatRequest]) -> tuple[_Chunk, dict[str, ChatRequest]]:
        """A chunk, and the requests of it that need a dry run (by quote key)."""
        keys = [cache_key(self.scope, r) for r in part]
        reuse: list[Reuse | None] = [None] * len(part)
        if self.answers is not None:
            reuse = await anyio.to_thread.run_sync(self.answers.decide, part)
        kept, since = self.kept, self.since
        cached = (
            {}
            if kept is None
            else await anyio.to_thread.run_sync(lambda: kept.cached_quotes(keys, since=since))
        )
        # identical bodies (same model, same request) are asked once: the key names the body;
        # a request answered by an earlier run is not asked at all
        missing = {
            k: r
            for k, r, u in zip(keys, part, reuse, strict=True)
            if k not in cached and (u is None or u.source is None)
        }
        chunk = _Chunk(part, keys, reuse, set(cached), dict(cached), list(missing), left=len(missing))
        if not missing:
            chunk.done.set()
        return chunk, missing

    def close(self) -> None:
        if self.answers is not None:
            self.answers.close()


class _Asker:
    """The dry runs, asked by as many workers as the concurrency, taking requests in file order (a
    task per request cost a fifth of the pre-flight's CPU at 20,000 requests)."""

    def __init__(
        self,
        provider: Provider,
        limits: Limits,
        policy: RetryPolicy,
        on_event: Listener,
        estimate: Estimate,
    ) -> None:
        self.provider, self.limits, self.policy = provider, limits, policy
        self.on_event, self.estimate = on_event, estimate
        # a dry run is a call the provider counts against --rpm/--tpm
        self.paced = getattr(provider, "dry_runs", False) and limits.rated
        self.asks: deque[tuple[_Chunk, str, ChatRequest]] = deque()
        self.more = anyio.Event()  # set (and replaced) when requests were added or reading is over
        self.open = True

    def add(self, chunk: _Chunk, missing: dict[str, ChatRequest]) -> None:
        self.asks.extend((chunk, key, request) for key, request in missing.items())
        self._wake()

    def close(self) -> None:
        """No more requests: the workers end once all are asked."""
        self.open = False
        self._wake()

    def _wake(self) -> None:
        self.more.set()
        self.more = anyio.Event()

    async def work(self) -> None:
        window = self.limits.window
        while True:
            while not self.asks:
                if not self.open:
                    return
                await self.more.wait()
            chunk, key, request = self.asks.popleft()
            await window.acquire()
            try:
                if self.paced:
                    await self.limits.pace(request)
                quote = await quote_with_retries(self.provider, request, self.policy, self.on_event)
                chunk.quotes[key] = quote
            finally:
                window.release()
            self.estimate.quote_calls += 1
            chunk.left -= 1
            if not chunk.left:
                chunk.done.set()


async def _finish(
    chunk: _Chunk,
    ledger: Ledger | None,
    estimate: Estimate,
    on_event: Listener,
    on_chunk: OnChunk | None,
) -> None:
    """A chunk whose quotes are all in: kept in the ledger's cache (when given one), handed on,
    counted."""
    await chunk.done.wait()
    if ledger is not None:
        await _keep(chunk, ledger)
    quotes = [
        REUSED if u is not None and u.source is not None else chunk.quotes[key]
        for key, u in zip(chunk.keys, chunk.reuse, strict=True)
    ]
    if on_chunk is not None:
        await on_chunk(chunk.requests, quotes, chunk.reuse)
    for key, request, quote, reuse in zip(chunk.keys, chunk.requests, quotes, chunk.reuse, strict=True):
        estimate.add(request, quote, reuse)
        cached = key in chunk.cached or reuse is not None
        on_event(Quoted(request.custom_id, cached=cached, known=quote.known))


async def _keep(chunk: _Chunk, ledger: Ledger) -> None:
    fresh = [
        {
            "key": k,
            "amount_nanos": q.nanos,
            "exact": q.exact,
            "source": q.source,
            "reason": q.reason or None,
        }
        for k in chunk.asked
        if (q := chunk.quotes[k]).amount is not None  # unknown quotes are asked again next time
    ]
    await anyio.to_thread.run_sync(ledger.store_quotes, fresh)


def fits(estimate: Estimate, remaining_nanos: int) -> tuple[bool, Decimal]:
    """Whether the quoted total fits, and the shortfall in USD when it does not."""
    shortfall = estimate.total_nanos - remaining_nanos
    return shortfall <= 0, from_nanos(max(0, shortfall))
