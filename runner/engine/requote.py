"""A batch run switching to calls: its lines not yet answered quoted again, as calls (concurrently,
where a quote is a dry run), before anything is cancelled or sent."""

from __future__ import annotations

from pathlib import Path

import anyio

from runner.core.config import RunConfig
from runner.core.errors import ProviderError
from runner.core.jobs import JobChunks
from runner.core.models import ChatRequest
from runner.ledger import Ledger
from runner.providers.base import Provider

CHUNK = 500  # job lines read at a time


async def call_quotes(
    provider: Provider, ledger: Ledger, run_id: str, job: Path, config: RunConfig
) -> dict[str, int]:
    """Quotes as calls of the run's lines still pending or in a batch, by custom_id; the first
    provider error when a quote could not be had."""
    quotes: dict[str, int] = {}
    failed: list[ProviderError] = []
    limiter = anyio.CapacityLimiter(config.concurrency)

    async def ask(request: ChatRequest) -> None:
        async with limiter:
            try:
                quote = await provider.quote(request)
            except ProviderError as exc:
                failed.append(exc)
                return
        quotes[request.custom_id] = quote.nanos if quote.nanos is not None else 0

    lines = JobChunks(job, CHUNK, config.max_line_bytes)
    try:
        index = 0
        while (chunk := await anyio.to_thread.run_sync(lines.take, index)) is not None:
            index += 1
            keep = await anyio.to_thread.run_sync(ledger.unfinished_ids, run_id, [r.custom_id for r in chunk])
            async with anyio.create_task_group() as tasks:
                for request in chunk:
                    if request.custom_id in keep:
                        tasks.start_soon(ask, request)
    finally:
        lines.close()
    if failed:
        raise failed[0]
    return quotes
