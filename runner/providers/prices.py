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
PRICE_KEYS = frozenset(
    {
        "input",
        "output",
        "context_window",
        "per_message_tokens",
        "per_request_tokens",
        "batch_input",
        "batch_output",
        "batch_discount",
    }
)


def load_prices(path: Path) -> dict[str, catalog.PriceEntry]:
    """A user price file (TOML or JSON): `{model: {input, output}}` in USD per 1M tokens, optionally
    under a `models` table, each with an optional `context_window`, template allowances
    (`per_message_tokens`, `per_request_tokens`) and Batch API prices (`batch_input` and
    `batch_output` per 1M tokens, or `batch_discount`: the share taken off, 0.5 for half price)."""
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
    prices = [_per_token(where, key, entry[key]) for key in ("input", "output")]
    batch = _batch_prices(where, entry, prices[0], prices[1])
    counts: dict[str, int | None] = {}
    for key in ("context_window", "per_message_tokens", "per_request_tokens"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            msg = f"{where}: {key}: must be a whole number of tokens"
            raise ConfigError(msg)
        counts[key] = value
    return catalog.PriceEntry(
        prices[0], prices[1], **counts, batch_input_price=batch[0], batch_output_price=batch[1]
    )


def _usd(where: str, key: str, value: object) -> Decimal:
    try:
        if isinstance(value, bool):
            raise ValueError
        return parse_usd(repr(value) if isinstance(value, float) else str(value))
    except ValueError:
        msg = f"{where}: {key}: {printable(str(value))} is not an amount in USD per 1M tokens"
        raise ConfigError(msg) from None


def _per_token(where: str, key: str, value: object) -> Decimal:
    """A price per 1M tokens from the file, checked, as USD per token."""
    usd = _usd(where, key, value)
    if usd > MAX_PER_MILLION or 0 < usd < MIN_PER_MILLION:
        msg = (
            f"{where}: {key}: {printable(str(value))} USD per 1M tokens is out of range (give 0, or "
            f"from {MIN_PER_MILLION} to {MAX_PER_MILLION:,}): a price that size is a typo"
        )
        raise ConfigError(msg)
    return usd / catalog.PER_MILLION


def _batch_prices(
    where: str, entry: dict[str, object], input_price: Decimal, output_price: Decimal
) -> tuple[Decimal | None, Decimal | None]:
    """The model's Batch API prices per token: given, or its synchronous ones less a discount."""
    given = [key for key in ("batch_input", "batch_output") if key in entry]
    if "batch_discount" in entry:
        if given:
            msg = f"{where}: give batch_input and batch_output, or batch_discount, not both"
            raise ConfigError(msg)
        off = _usd(where, "batch_discount", entry["batch_discount"])
        if not 0 <= off < 1:
            msg = f"{where}: batch_discount: the share taken off, from 0 to below 1 (0.5 for half price)"
            raise ConfigError(msg)
        return input_price * (1 - off), output_price * (1 - off)
    if not given:
        return None, None
    if len(given) == 1:
        msg = f"{where}: give both batch_input and batch_output"
        raise ConfigError(msg)
    return _per_token(where, "batch_input", entry["batch_input"]), _per_token(
        where, "batch_output", entry["batch_output"]
    )


def price_table(settings: ProviderSettings) -> dict[str, ModelInfo]:
    """The models a job may name: the catalog (the Run API's models), and on an OpenAI-compatible
    endpoint any model the price file prices."""
    if settings.name != "openai" or settings.price_file is None:
        return catalog.MODELS
    return catalog.with_prices(catalog.MODELS, load_prices(settings.price_file))
