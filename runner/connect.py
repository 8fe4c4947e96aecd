"""Pick and open a provider from settings; `simulator` starts one in-process on loopback."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from runner import catalog
from runner.catalog import ModelInfo
from runner.errors import ConfigError
from runner.money import parse_usd
from runner.providers.base import Provider
from runner.providers.openai import OpenAIProvider
from runner.providers.orthogonal import DEFAULT_API, DEFAULT_BASE_URL, OrthogonalProvider

if TYPE_CHECKING:
    from runner.simulator import Books

PROVIDERS = ("orthogonal", "openai", "simulator")


@dataclass(frozen=True)
class ProviderSettings:
    name: str = "orthogonal"
    base_url: str | None = None
    api_key: str | None = None
    api: str = DEFAULT_API
    price_file: Path | None = None
    max_connections: int = 256
    sim_balance: str = "100"
    sim_pricing: str = "tokens"
    sim_latency: str = "0"


@dataclass
class Connection:
    provider: Provider
    scope: str  # what quotes are cached under
    books: Books | None = None  # the in-process simulator's books
    # how another process reaches the same provider (the sending helpers); its API key is read from
    # the same environment, except the in-process simulator's, which is no secret
    reach: ProviderSettings | None = None


def load_prices(path: Path) -> dict[str, tuple[Decimal, Decimal]]:
    """A user price file (TOML or JSON): {model: {input: USD per 1M, output: USD per 1M}}."""
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        msg = f"{path}: cannot read the price file: {exc}"
        raise ConfigError(msg) from None
    table = data.get("models", data)
    prices: dict[str, tuple[Decimal, Decimal]] = {}
    for model, entry in table.items():
        try:
            inp = parse_usd(str(entry["input"])) / catalog.PER_MILLION
            out = parse_usd(str(entry["output"])) / catalog.PER_MILLION
        except (KeyError, TypeError, ValueError):
            msg = f"{path}: {model}: give 'input' and 'output' in USD per 1M tokens"
            raise ConfigError(msg) from None
        prices[model] = (inp, out)
    return prices


def price_table(settings: ProviderSettings) -> dict[str, ModelInfo]:
    if settings.price_file is None:
        return catalog.MODELS
    return catalog.with_prices(catalog.MODELS, load_prices(settings.price_file))


def _http_url(url: str) -> str:
    """A base URL that can be called: http(s), with a host."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.strip("/"):
        msg = f"the base URL must look like https://host[:port][/path] (got '{url}')"
        raise ConfigError(msg)
    return url


@asynccontextmanager
async def connect(settings: ProviderSettings) -> AsyncIterator[Connection]:
    if settings.name == "simulator":
        # imported here: the simulator's server (aiohttp) costs memory a run elsewhere does not need
        from runner.simulator import Books, parse_latency, serve  # noqa: PLC0415

        books = Books(pricing=settings.sim_pricing, latency=parse_latency(settings.sim_latency))
        books.configure({"balance": settings.sim_balance})
        async with serve(books) as url:
            provider = OrthogonalProvider(api_key="simulator-key", base_url=url, api=settings.api)
            try:
                reach = ProviderSettings("orthogonal", url, "simulator-key", settings.api)
                yield Connection(provider, f"simulator:{settings.sim_pricing}", books, reach)
            finally:
                await provider.aclose()
        return
    if settings.name == "orthogonal":
        key = settings.api_key or os.environ.get("ORTHOGONAL_API_KEY")
        if not key:
            msg = "set ORTHOGONAL_API_KEY (or use --provider simulator to try runner offline)"
            raise ConfigError(msg)
        base = _http_url(settings.base_url or os.environ.get("ORTHOGONAL_BASE_URL") or DEFAULT_BASE_URL)
        orth = OrthogonalProvider(api_key=key, base_url=base, api=settings.api)
        try:
            reach = dataclasses.replace(settings, base_url=base)
            yield Connection(orth, f"orthogonal:{base}:{settings.api}", reach=reach)
        finally:
            await orth.aclose()
        return
    if settings.name == "openai":
        openai_base = settings.base_url or os.environ.get("OPENAI_BASE_URL")
        if not openai_base:
            msg = "set OPENAI_BASE_URL or --base-url for the openai provider"
            raise ConfigError(msg)
        openai_base = _http_url(openai_base)
        key = settings.api_key or os.environ.get("OPENAI_API_KEY") or ""
        oai = OpenAIProvider(base_url=openai_base, api_key=key, prices=price_table(settings))
        try:
            reach = dataclasses.replace(settings, base_url=openai_base)
            yield Connection(oai, f"openai:{openai_base}", reach=reach)
        finally:
            await oai.aclose()
        return
    msg = f"unknown provider '{settings.name}'; choose one of {', '.join(PROVIDERS)}"
    raise ConfigError(msg)
