"""Frozen data passed between the layers: requests, quotes, usage and outcomes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from runner.core import codec
from runner.core.money import to_nanos

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One validated line of a job file."""

    file: str
    line: int
    custom_id: str
    body: JSON = field(hash=False, compare=False)
    metadata: JSON = field(hash=False, compare=False)
    sha256: str

    @property
    def model(self) -> str:
        return str(self.body["model"])

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream", False))

    @property
    def answer_key(self) -> str:
        """What an answer is reused by: the body's hash, and the line's sample mark
        (`metadata.sample`) when it has one, so identical lines marked as samples are each sent."""
        sample = self.metadata.get("sample") if self.metadata else None
        if sample is None:
            return self.sha256
        return hashlib.sha256(self.sha256.encode() + b"|" + codec.canonical(sample)).hexdigest()


@dataclass(frozen=True, slots=True)
class Quote:
    """What a request costs: exact (dry run) or an upper bound (price table); None = unknown."""

    amount: Decimal | None
    exact: bool
    source: str  # "dry_run" | "price_table" | "estimate"
    reason: str = ""
    # the amount in nano-USD, rounded up (what is reserved); worked out from `amount` unless given
    nanos: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.nanos is None and self.amount is not None:
            object.__setattr__(self, "nanos", to_nanos(self.amount, round_up=True))

    @property
    def known(self) -> bool:
        return self.amount is not None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: JSON | None) -> Usage:
        if not usage:
            return cls()
        completion_details = usage.get("completion_tokens_details") or {}
        prompt_details = usage.get("prompt_tokens_details") or {}
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
            cached_tokens=int(prompt_details.get("cached_tokens") or 0),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """A completed request: the chat.completion, what it used and what it cost."""

    completion: JSON
    usage: Usage
    price: Decimal | None
    latency_s: float
    first_token_s: float | None = None
    request_id: str | None = None
    mode: str = "sync"  # how it was bought: sync (a call) | batch (a line of a provider's batch)
    sync_price: Decimal | None = None  # what the same usage costs as a call (a batch line's saving)

    @property
    def message(self) -> JSON:
        choices = self.completion.get("choices") or [{}]
        return dict(choices[0].get("message") or {})

    @property
    def finish_reason(self) -> str | None:
        choices = self.completion.get("choices") or [{}]
        reason = choices[0].get("finish_reason")
        return None if reason is None else str(reason)
