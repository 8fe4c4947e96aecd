"""A request's result, declared once: each field's name (its column in the ledger's `requests` table
and in the Parquet), its type, and how an answer fills it. The settlement writes `result_values`,
a copy answered from the ledger takes the `copied` fields from the answer it copies, the export
reads and types the `exported` ones, and the tables' test checks each has its column. A new result
column is its line here, its migration, and (where an answer does not carry it yet) the provider's
parsing that puts it in the Outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.core import codec
from runner.core.models import JSON, Outcome
from runner.core.money import to_nanos


@dataclass(frozen=True)
class ResultField:
    name: str
    kind: type  # int | float | str: the Parquet's Int64 | Float64 | String
    fill: Callable[[Outcome, JSON], Any]  # (the answer, its message) → the value
    copied: bool = True  # a copy of this answer (the cache) takes it; timings are the call's own
    exported: bool = True  # a column of the Parquet (the whole response stays in the ledger)


def _sync_price(outcome: Outcome) -> int | None:
    price = outcome.sync_price if outcome.sync_price is not None else outcome.price
    return None if price is None else to_nanos(price)


def _tool_calls(message: JSON) -> str | None:
    return codec.dumps_text(message["tool_calls"]) if message.get("tool_calls") else None


RESULT_FIELDS: tuple[ResultField, ...] = (
    ResultField("content", str, lambda _, m: m.get("content")),
    ResultField("reasoning_content", str, lambda _, m: m.get("reasoning_content") or m.get("reasoning")),
    ResultField("tool_calls", str, lambda _, m: _tool_calls(m)),
    ResultField("finish_reason", str, lambda o, _: o.finish_reason),
    ResultField("prompt_tokens", int, lambda o, _: o.usage.prompt_tokens),
    ResultField("completion_tokens", int, lambda o, _: o.usage.completion_tokens),
    ResultField("reasoning_tokens", int, lambda o, _: o.usage.reasoning_tokens),
    ResultField("cached_tokens", int, lambda o, _: o.usage.cached_tokens),
    ResultField("response_json", str, lambda o, _: codec.dumps_text(o.completion), exported=False),
    ResultField("latency_s", float, lambda o, _: o.latency_s, copied=False),
    ResultField("first_token_s", float, lambda o, _: o.first_token_s, copied=False),
    ResultField("mode", str, lambda o, _: o.mode, copied=False),  # a copy was not bought at all
    # what the answer would have cost as a call: a batch line's saving is this less its price
    ResultField("sync_price_nanos", int, lambda o, _: _sync_price(o), copied=False, exported=False),
)


def result_values(outcome: Outcome) -> dict[str, Any]:
    """The result fields of an answer, by name: what its settlement writes."""
    message = outcome.message
    return {f.name: f.fill(outcome, message) for f in RESULT_FIELDS}


def copied_names() -> list[str]:
    return [f.name for f in RESULT_FIELDS if f.copied]


def exported_fields() -> list[ResultField]:
    return [f for f in RESULT_FIELDS if f.exported]
