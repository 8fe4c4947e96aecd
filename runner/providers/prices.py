"""Prices for OpenAI-compatible endpoints: the catalog, and a user's price file (TOML or JSON)."""

from __future__ import annotations

import json
import tomllib
from decimal import Decimal
from pathlib import Path

from runner.core import catalog
from runner.core.catalog import ModelInfo
from runner.core.config import ProviderSettings
from runner.core.errors import ConfigError, printable
from runner.core.money import parse_usd

# a price per 1M tokens outside these is a mistake, not a model: above it a job's money overflows what
# the ledger keeps exactly; below it (and above 0) a request's cost is less than a nano-dollar
MAX_PER_MILLION = Decimal(100_000)
MIN_PER_MILLION = Decimal("0.000001")
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
        if usd > MAX_PER_MILLION or 0 < usd < MIN_PER_MILLION:
            msg = (
                f"{where}: {key}: {printable(str(value))} USD per 1M tokens is out of range (give 0, or "
                f"from {MIN_PER_MILLION} to {MAX_PER_MILLION:,}): a price that size is a typo"
            )
            raise ConfigError(msg)
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
