"""Pick and open a provider from settings; `simulator` starts one in-process on loopback."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runner.core import catalog
from runner.core.catalog import ModelInfo
from runner.core.config import ProviderSettings
from runner.core.errors import ConfigError, printable
from runner.core.money import parse_usd
from runner.providers.base import Provider
from runner.providers.openai import OpenAIProvider
from runner.providers.orthogonal import DEFAULT_API, DEFAULT_BASE_URL, OrthogonalProvider

if TYPE_CHECKING:
    from runner.simulator import Books


@dataclass
class Connection:
    provider: Provider
    scope: str  # what quotes are cached under
    books: Books | None = None  # the in-process simulator's books


PRICE_KEYS = frozenset({"input", "output", "context_window", "per_message_tokens", "per_request_tokens"})


def load_prices(path: Path) -> dict[str, catalog.PriceEntry]:
    """A user price file (TOML or JSON): `{model: {input, output}}` in USD per 1M tokens, optionally
    under a `models` table, each with an optional `context_window` and template allowances
    (`per_message_tokens`, `per_request_tokens`)."""
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        msg = f"{path}: cannot read the price file: {exc}"
        raise ConfigError(msg) from None
    table = data.get("models", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        msg = f"{path}: expected a table of models"
        raise ConfigError(msg)
    return {str(model): _price_entry(path, str(model), entry) for model, entry in table.items()}


def _price_entry(path: Path, model: str, entry: object) -> catalog.PriceEntry:
    where = f"{path}: {printable(model)}"
    if not isinstance(entry, dict) or "input" not in entry or "output" not in entry:
        msg = f"{where}: give 'input' and 'output' in USD per 1M tokens"
        raise ConfigError(msg)
    unknown = sorted(set(entry) - PRICE_KEYS)
    if unknown:
        msg = f"{where}: unknown key '{printable(unknown[0])}' (known: {', '.join(sorted(PRICE_KEYS))})"
        raise ConfigError(msg)
    prices = []
    for key in ("input", "output"):
        value = entry[key]
        try:
            if isinstance(value, bool):
                raise ValueError
            usd = parse_usd(repr(value) if isinstance(value, float) else str(value))
        except ValueError:
            msg = f"{where}: {key}: {printable(str(value))} is not an amount in USD per 1M tokens"
            raise ConfigError(msg) from None
        prices.append(usd / catalog.PER_MILLION)
    counts: dict[str, int | None] = {}
    for key in ("context_window", "per_message_tokens", "per_request_tokens"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            msg = f"{where}: {key}: must be a whole number of tokens"
            raise ConfigError(msg)
        counts[key] = value
    return catalog.PriceEntry(prices[0], prices[1], **counts)


def price_table(settings: ProviderSettings) -> dict[str, ModelInfo]:
    """The models a job may name: the catalog (the Run API's models), and on an OpenAI-compatible
    endpoint any model the price file prices."""
    if settings.name != "openai" or settings.price_file is None:
        return catalog.MODELS
    return catalog.with_prices(catalog.MODELS, load_prices(settings.price_file))


def provider_of_scope(scope: str) -> tuple[str, str | None, str]:
    """(provider, base URL, simulator pricing) from a connection's scope, as a run records it: the
    openers below write `orthogonal:BASE:API`, `openai:BASE` or `simulator:PRICING`."""
    name, _, rest = scope.partition(":")
    if name == "simulator":
        return name, None, rest or "tokens"
    if name == "orthogonal":
        return name, rest.rpartition(":")[0] or None, "tokens"
    return name, rest or None, "tokens"


def _http_url(url: str) -> str:
    """A base URL that can be called: http(s), with a host."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.strip("/"):
        msg = f"the base URL must look like https://host[:port][/path] (got '{url}')"
        raise ConfigError(msg)
    return url


@asynccontextmanager
async def _opened(provider: Provider, scope: str, books: Books | None = None) -> AsyncIterator[Connection]:
    """A connection over `provider`, whose connections are closed after."""
    try:
        yield Connection(provider, scope, books)
    finally:
        await provider.aclose()


@asynccontextmanager
async def _simulator(settings: ProviderSettings) -> AsyncIterator[Connection]:
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
        async with _opened(provider, f"simulator:{settings.sim_pricing}", books) as conn:
            yield conn


@asynccontextmanager
async def _orthogonal(settings: ProviderSettings) -> AsyncIterator[Connection]:
    key = settings.api_key or os.environ.get("ORTHOGONAL_API_KEY")
    if not key:
        msg = "set ORTHOGONAL_API_KEY (or use --provider simulator to try runner offline)"
        raise ConfigError(msg)
    base = _http_url(settings.base_url or os.environ.get("ORTHOGONAL_BASE_URL") or DEFAULT_BASE_URL)
    provider = OrthogonalProvider(
        api_key=key,
        base_url=base,
        api=settings.api or DEFAULT_API,
        max_connections=settings.max_connections,
        timeouts=settings.timeouts,
    )
    async with _opened(provider, f"orthogonal:{base}:{settings.api or DEFAULT_API}") as conn:
        yield conn


@asynccontextmanager
async def _openai(settings: ProviderSettings) -> AsyncIterator[Connection]:
    base = settings.base_url or os.environ.get("OPENAI_BASE_URL")
    if not base:
        msg = "set OPENAI_BASE_URL or --base-url for the openai provider"
        raise ConfigError(msg)
    base = _http_url(base)
    provider = OpenAIProvider(
        base_url=base,
        api_key=settings.api_key or os.environ.get("OPENAI_API_KEY") or "",
        prices=price_table(settings),
        max_connections=settings.max_connections,
        timeouts=settings.timeouts,
    )
    async with _opened(provider, f"openai:{base}") as conn:
        yield conn


# --provider NAME → how to open it: a new provider is a module of its own and one line here
PROVIDERS: dict[str, Callable[[ProviderSettings], AbstractAsyncContextManager[Connection]]] = {
    "orthogonal": _orthogonal,
    "openai": _openai,
    "simulator": _simulator,
}


def connect(settings: ProviderSettings) -> AbstractAsyncContextManager[Connection]:
    opener = PROVIDERS.get(settings.name)
    if opener is None:
        msg = f"unknown provider '{settings.name}'; choose one of {', '.join(PROVIDERS)}"
        raise ConfigError(msg)
    return opener(settings)
