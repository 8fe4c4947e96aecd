"""The concurrency window under 429s, as a remote API gives them: in bursts."""

from __future__ import annotations

import time

import anyio

from runner.core.models import ChatRequest
from runner.providers.limits import AdaptiveLimit, Limits


async def test_a_burst_of_429s_from_requests_in_flight_together_cuts_the_window_once() -> None:
    limit = AdaptiveLimit(64)
    sent = []
    for _ in range(64):
        await limit.acquire()
        sent.append(time.monotonic())
    for sent_at in sent:  # every one of the 64 comes back 429
        limit.on_rate_limited(sent_at)
        limit.release()
    assert limit.current == 32  # halved once, not 64 times down to 1
    await anyio.sleep(0.01)
    limit.on_rate_limited(time.monotonic())  # a request sent after the cut: a new signal
    assert limit.current == 16


def test_the_window_grows_back_by_a_slot_per_window_of_successes() -> None:
    limit = AdaptiveLimit(64)
    limit.on_rate_limited(time.monotonic())
    assert limit.current == 32
    for _ in range(32):  # one window's worth of successes
        limit.on_success()
    assert 32.9 < limit.current < 33.1
    for _ in range(10_000):
        limit.on_success()
    assert limit.current == 64  # never past the concurrency asked for


async def test_limits_pace_at_the_rpm_from_an_empty_bucket() -> None:
    limits = Limits(4, rpm=1200)  # 20 a second at 99.5 %
    request = ChatRequest("job.jsonl", 1, "a", {"model": "m", "messages": []}, {}, "0" * 64)
    started = time.monotonic()
    for _ in range(5):
        await limits.pace(request)
    assert 0.2 < time.monotonic() - started < 2.0  # no burst at the start (the upper bound: a busy machine)


async def test_spending_is_paced_under_max_usd_per_hour() -> None:
    from decimal import Decimal  # noqa: PLC0415

    limits = Limits(4, usd_per_hour=Decimal("3.6"))  # $0.001 a second, a minute's worth at once
    started = time.monotonic()
    await limits.spend(60_000_000)  # $0.06: the first minute's worth, at once
    at_once = time.monotonic() - started
    await limits.spend(500_000)  # $0.0005 more waits half a second
    assert at_once < 0.3 < 0.4 < time.monotonic() - started < 2.0


def test_a_deadline_is_a_duration_a_time_of_day_or_a_date_and_time() -> None:
    from datetime import datetime  # noqa: PLC0415

    import pytest  # noqa: PLC0415

    from runner.core.config import parse_deadline  # noqa: PLC0415
    from runner.core.errors import ConfigError  # noqa: PLC0415

    now = datetime(2026, 12, 2, 22, 0).astimezone().timestamp()
    assert parse_deadline("2h30m", now) == now + 9000
    assert parse_deadline("90", now) == now + 90
    assert parse_deadline("06:30", now) == datetime(2026, 12, 3, 6, 30).astimezone().timestamp()
    assert parse_deadline("23:15", now) == datetime(2026, 12, 2, 23, 15).astimezone().timestamp()
    assert parse_deadline("2026-12-03T05:00", now) == datetime(2026, 12, 3, 5, 0).astimezone().timestamp()
    with pytest.raises(ConfigError, match="is not a duration"):
        parse_deadline("soon", now)
