"""`--provider simulator`: runner's own simulator, started in-process on loopback, spoken to as the
Run API (offline; its books are kept on the connection)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from runner.core import catalog
from runner.core.config import ProviderSettings, RetryPolicy
from runner.providers import http
from runner.providers.batch import BatchClient
from runner.providers.connection import Connection, opened
from runner.providers.orthogonal import DEFAULT_API, OrthogonalProvider

KEY = "simulator-key"


@asynccontextmanager
async def connect(settings: ProviderSettings) -> AsyncIterator[Connection]:
    # imported here: the simulator's server costs memory a run elsewhere does not need
    from runner.simulator import Books, parse_latency, serve  # noqa: PLC0415
    from runner.simulator.batches import BATCH_DISCOUNT  # noqa: PLC0415

    books = Books(
        pricing=settings.sim_pricing,
        latency=parse_latency(settings.sim_latency),
        dry_run_latency=parse_latency(settings.sim_dry_run_latency),
    )
    books.configure({"balance": settings.sim_balance})
    async with serve(books) as url:
        provider = OrthogonalProvider(
            api_key=KEY,
            base_url=url,
            api=settings.api or DEFAULT_API,
            max_connections=settings.max_connections,
            timeouts=settings.timeouts,
        )
        # its Batch API, in OpenAI's shapes, at half its prices (by tokens: flat pricing has no batches)
        secret = http.Secret(KEY)
        endpoint = http.Endpoint(
            f"{url}/v1", headers={"Authorization": f"Bearer {KEY}"}, timeouts=settings.timeouts, secret=secret
        )
        prices = (
            {slug: info.with_batch_discount(BATCH_DISCOUNT) for slug, info in catalog.MODELS.items()}
            if settings.sim_pricing == "tokens"
            else catalog.MODELS
        )
        batches = BatchClient(endpoint, secret, prices, RetryPolicy())
        try:
            async with opened(provider, f"simulator:{settings.sim_pricing}", books, batches) as conn:
                yield conn
        finally:
            await endpoint.aclose()
