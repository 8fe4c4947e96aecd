"""`--provider simulator`: runner's own simulator, started in-process on loopback, spoken to as the
Run API (offline; its books are kept on the connection)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from runner.core.config import ProviderSettings
from runner.providers.base import Connection, opened
from runner.providers.orthogonal import DEFAULT_API, OrthogonalProvider


@asynccontextmanager
async def connect(settings: ProviderSettings) -> AsyncIterator[Connection]:
    # imported here: the simulator's server costs memory a run elsewhere does not need
    from runner.simulator import Books, parse_latency, serve  # noqa: PLC0415

    books = Books(
        pricing=settings.sim_pricing,
        latency=parse_latency(settings.sim_latency),
        dry_run_latency=parse_latency(settings.sim_dry_run_latency),
    )
    books.configure({"balance": settings.sim_balance})
    async with serve(books) as url:
        provider = OrthogonalProvider(
            api_key="simulator-key",
            base_url=url,
            api=settings.api or DEFAULT_API,
            max_connections=settings.max_connections,
            timeouts=settings.timeouts,
        )
        async with opened(provider, f"simulator:{settings.sim_pricing}", books) as conn:
            yield conn
