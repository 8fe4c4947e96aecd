"""The expected cost beside the bound: a request's quote less what its answer is unlikely to use.

A quote holds the prompt (counted by the server, or bounded) and the whole answer the request allows
(`max_tokens`, else the context window, × choices). What a model's answers have used of that bound in
this ledger's earlier runs on the same provider (the mean of completion tokens ÷ the bound) gives the
expected answer; with no earlier answer, half the bound, said as such."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from runner.core import schema
from runner.core.catalog import ModelInfo
from runner.core.models import ChatRequest, Quote
from runner.core.money import to_nanos
from runner.ledger import Ledger

DEFAULT_SHARE = 0.5  # of the answer's bound, for a model this ledger has seen no answer of


@dataclass
class Expectation:
    """Per model, the share of the answer's bound its answers use, and the prices the quotes used."""

    prices: dict[str, ModelInfo]
    shares: dict[str, float] = field(default_factory=dict)  # seen in this ledger

    @classmethod
    def load(
        cls, ledger: Ledger, scope: str, prices: dict[str, ModelInfo], models: Iterable[str]
    ) -> Expectation:
        seen = ledger.completion_shares(scope)
        return cls(prices, {m: seen[m] for m in models if m in seen})

    def share(self, model: str) -> float:
        return self.shares.get(model, DEFAULT_SHARE)

    def guessed(self, models: Iterable[str]) -> list[str]:
        """The models whose expectation is the default (no earlier answer in the ledger)."""
        return sorted(m for m in set(models) if m not in self.shares)

    def expected(self, request: ChatRequest, quote: Quote) -> int:
        """The request's expected cost in nano-USD (its quote when it cannot be split)."""
        assert quote.nanos is not None
        info = self.prices.get(request.model)
        if info is None or info.output_price is None:
            return quote.nanos
        bound = schema.output_token_bound(request.body, info)
        answer = to_nanos(bound * info.output_price)
        prompt = max(0, quote.nanos - answer)
        return prompt + min(answer, round(answer * self.share(request.model)))
