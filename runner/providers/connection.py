"""A provider opened for a run: the provider, the scope its quotes are kept under, its Batch API
where it has one, and the in-process simulator's books."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runner.providers.base import Provider
from runner.providers.batch import BatchClient

if TYPE_CHECKING:
    from runner.simulator import Books


@dataclass
class Connection:
    provider: Provider
    scope: str  # what quotes are cached under
    books: Books | None = None  # the in-process simulator's books
    batches: BatchClient | None = None  # the provider's Batch API, where it has one


@asynccontextmanager
async def opened(
    provider: Provider, scope: str, books: Books | None = None, batches: BatchClient | None = None
) -> AsyncIterator[Connection]:
    """A connection over `provider`, whose connections are closed after."""
    try:
        yield Connection(provider, scope, books, batches)
    finally:
        await provider.aclose()
