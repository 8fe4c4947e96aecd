"""The one retry path, for dry runs and calls alike: tenacity, exponential backoff with full jitter
under a cap, the server's Retry-After honoured, and only what the provider calls retryable retried."""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from runner.core.config import RetryPolicy
from runner.core.errors import ProviderError, RetryableError
from runner.providers import http

OnRetry = Callable[[int, float, BaseException | None], None]  # (attempt that failed, wait, error)
_JITTER = random.Random()  # one for all: seeding a Random costs more than a dry run's own bookkeeping


def first_wait(policy: RetryPolicy, error: ProviderError) -> float:
    """The wait after a first attempt made outside tenacity (most calls succeed at once, and
    tenacity's loop costs more than a call's own bookkeeping)."""
    return http.backoff_s(policy, 1, error.retry_after, _JITTER)


def retrying(policy: RetryPolicy, on_retry: OnRetry, *, made: int = 0) -> AsyncRetrying:
    """Attempts up to `policy.attempts` in all, `made` of them already made before this loop."""

    def wait(state: RetryCallState) -> float:
        failed = made + state.attempt_number
        error = state.outcome.exception() if state.outcome else None
        after = error.retry_after if isinstance(error, ProviderError) else None
        seconds = http.backoff_s(policy, failed, after, _JITTER)
        on_retry(failed, seconds, error)
        return seconds

    return AsyncRetrying(
        stop=stop_after_attempt(max(1, policy.attempts - made)),
        wait=wait,
        retry=retry_if_exception_type(RetryableError),
        sleep=anyio.sleep,
        reraise=True,
    )
