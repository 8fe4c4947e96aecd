"""The model catalog of the Run API's Baseten endpoint: context windows, reasoning, prices.

Prices are USD per token, kept exact; a price nobody published is None ("unknown"), never zero.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal

PER_MILLION = Decimal(1_000_000)
FLAT_CALL_PRICE = Decimal("0.01")  # the per-call listing's flat price
DEFAULT_MAX_TOKENS = 4096
# what a chat template may add around the text of a request, in tokens (a price file can change them)
PER_MESSAGE_TOKENS = 16
PER_REQUEST_TOKENS = 256


@dataclass(frozen=True, slots=True)
class ModelInfo:
    slug: str
    context_window: int | None  # None: not known (a model priced by a price file alone)
    reasoning_effort: bool  # accepts the reasoning_effort parameter
    always_reasons: bool  # emits reasoning whatever is asked
    input_price: Decimal | None  # USD per token
    output_price: Decimal | None
    per_message_tokens: int = PER_MESSAGE_TOKENS
    per_request_tokens: int = PER_REQUEST_TOKENS
    # the provider's Batch API prices, USD per token (None: it sells this model in batches at no price
    # runner knows)
    batch_input_price: Decimal | None = None
    batch_output_price: Decimal | None = None

    @property
    def priced(self) -> bool:
        return self.input_price is not None and self.output_price is not None

    def at_batch_prices(self) -> ModelInfo | None:
        """This model as its Batch API sells it (quotes and prices computed as for a call), or None
        when no batch price is known."""
        if self.batch_input_price is None or self.batch_output_price is None:
            return None
        return replace(self, input_price=self.batch_input_price, output_price=self.batch_output_price)

    def with_batch_discount(self, fraction_paid: Decimal) -> ModelInfo:
        """This model with batch prices of `fraction_paid` × its synchronous ones."""
        if self.input_price is None or self.output_price is None:
            return self
        return replace(
            self,
            batch_input_price=self.input_price * fraction_paid,
            batch_output_price=self.output_price * fraction_paid,
        )

    @property
    def reasons(self) -> bool:
        return self.reasoning_effort or self.always_reasons


def _per_token(per_million: str | None) -> Decimal | None:
    return None if per_million is None else Decimal(per_million) / PER_MILLION


def _model(
    slug: str, context: int, *, effort: bool, always: bool = False, price: tuple[str, str] | None
) -> ModelInfo:
    return ModelInfo(
        slug=slug,
        context_window=context,
        reasoning_effort=effort,
        always_reasons=always,
        input_price=_per_token(price[0] if price else None),
        output_price=_per_token(price[1] if price else None),
    )


MODELS: dict[str, ModelInfo] = {
    m.slug: m
    for m in (
        _model("deepseek-ai/DeepSeek-V3-0324", 163_840, effort=True, price=("0.77", "0.77")),
        _model("deepseek-ai/DeepSeek-V3.1", 163_840, effort=True, price=("0.50", "1.50")),
        _model("zai-org/GLM-4.6", 200_000, effort=True, price=("0.60", "2.20")),
        _model("zai-org/GLM-4.7", 200_000, effort=True, price=("0.60", "2.20")),
        _model("moonshotai/Kimi-K2-Instruct-0905", 131_072, effort=False, price=None),
        _model("moonshotai/Kimi-K2-Thinking", 262_144, effort=True, always=True, price=None),
        _model("moonshotai/Kimi-K2.5", 262_144, effort=False, price=("0.60", "3.00")),
        _model("openai/gpt-oss-120b", 131_072, effort=False, price=("0.10", "0.50")),
    )
}


def get(slug: str) -> ModelInfo | None:
    return MODELS.get(slug)


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One model of a user's price file: USD per token, and what it may say of the model."""

    input_price: Decimal
    output_price: Decimal
    context_window: int | None = None
    per_message_tokens: int | None = None
    per_request_tokens: int | None = None
    batch_input_price: Decimal | None = None
    batch_output_price: Decimal | None = None


def with_prices(base: dict[str, ModelInfo], entries: dict[str, PriceEntry]) -> dict[str, ModelInfo]:
    """A copy of `base` where a price file's `entries` add models or replace their prices; a model
    outside `base` keeps what the entry says of it (no context window unless it gives one)."""
    merged = dict(base)
    for slug, entry in entries.items():
        known = merged.get(slug)
        merged[slug] = ModelInfo(
            slug=slug,
            context_window=entry.context_window or (known.context_window if known else None),
            reasoning_effort=known.reasoning_effort if known else False,
            always_reasons=known.always_reasons if known else False,
            input_price=entry.input_price,
            output_price=entry.output_price,
            per_message_tokens=_first(entry.per_message_tokens, PER_MESSAGE_TOKENS),
            per_request_tokens=_first(entry.per_request_tokens, PER_REQUEST_TOKENS),
            batch_input_price=entry.batch_input_price,
            batch_output_price=entry.batch_output_price,
        )
    return merged


def _first(value: int | None, default: int) -> int:
    return default if value is None else value
