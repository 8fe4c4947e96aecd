"""The simulator's state: prices, balance, its own charge ledger, counters and the fault plan."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from runner.core import catalog, schema
from runner.core.catalog import ModelInfo
from runner.core.money import from_nanos, parse_usd, to_nanos

# Models without a published price get a stand-in in the simulator only (it is fake anyway).
STAND_IN_PRICE = (Decimal("1.00") / catalog.PER_MILLION, Decimal("3.00") / catalog.PER_MILLION)
FAULT_KINDS = ("429", "500", "502", "503", "502html", "reset", "stall", "envelope")


def parse_latency(text: str | float | None) -> tuple[str, float, float]:
    """'0.2' fixed · '0.1-0.3' uniform · 'exp:0.2' exponential with that mean."""
    if text is None or text == "":
        return ("fixed", 0.0, 0.0)
    value = str(text)
    if value.startswith("exp:"):
        return ("exp", float(value[4:]), 0.0)
    if "-" in value.strip("-"):
        low, high = value.split("-", 1)
        return ("uniform", float(low), float(high))
    return ("fixed", float(value), 0.0)


@dataclass
class ScriptedFault:
    fault: str
    match: str | None = None  # a substring of the request body's JSON; None = the next call
    target: str = "call"  # call | dry_run | any


@dataclass
class Books:
    pricing: str = "tokens"  # tokens | flat
    balance_nanos: int = to_nanos(Decimal(100))
    latency: tuple[str, float, float] = ("fixed", 0.0, 0.0)
    dry_run_latency: tuple[str, float, float] = ("fixed", 0.0, 0.0)  # a dry run's round trip
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    retry_after_s: float = 1.0
    stall_s: float = 3600.0
    api_key: str | None = None
    script: list[ScriptedFault] = field(default_factory=list)
    transactions: list[dict[str, Any]] = field(default_factory=list)
    # the simulator honours Idempotency-Key: a charged call's reply is kept under its key and a call
    # with the same key is answered with it, not charged again
    idempotent: bool = True
    replies: dict[str, Any] = field(default_factory=dict)
    # whether GET /v1/credits/transactions lists the charges (off: a provider that shows only a balance)
    lists_transactions: bool = True
    counters: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0  # calls (not dry runs) being answered now, and the most at once
    peak_in_flight: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    # the Batch API (runner.simulator.batches): seconds a batch takes once in progress; the fraction
    # of its lines after which the next batch created expires (None: it completes); the share of
    # lines answered with an error; the most lines a batch may have
    batch_duration: float = 3.0
    batch_expire_fraction: float | None = None
    batch_line_error_rate: float = 0.0
    batch_max_requests: int = 50_000

    def authorized(self, header: str) -> bool:
        """Whether an Authorization header carries a key this simulator takes."""
        if not header.startswith("Bearer ") or not header[7:].strip():
            return False
        return self.api_key is None or header[7:] == self.api_key

    def prices(self, model: ModelInfo | None) -> tuple[Decimal, Decimal]:
        if model is None or model.input_price is None or model.output_price is None:
            return STAND_IN_PRICE
        return model.input_price, model.output_price

    def quote(self, body: dict[str, Any], prompt_tokens: int) -> Decimal:
        if self.pricing == "flat":
            return catalog.FLAT_CALL_PRICE
        inp, out = self.prices(catalog.get(str(body.get("model"))))
        return prompt_tokens * inp + schema.max_output_tokens(body) * out

    def charge_for(self, model: str, prompt_tokens: int, completion_tokens: int) -> Decimal:
        if self.pricing == "flat":
            return catalog.FLAT_CALL_PRICE
        inp, out = self.prices(catalog.get(model))
        return prompt_tokens * inp + completion_tokens * out

    def charge(
        self,
        amount: Decimal,
        *,
        model: str,
        endpoint: str,
        body_sha: str,
        client_request_id: str | None = None,
        idempotency_key: str | None = None,
        custom_id: str | None = None,
        batch_id: str | None = None,
    ) -> str | None:
        """Debit the balance; None when it cannot cover the amount (→ 402)."""
        nanos = to_nanos(amount)
        if nanos > self.balance_nanos:
            return None
        self.balance_nanos -= nanos
        request_id = f"req_sim_{uuid.uuid4().hex[:16]}"
        self.transactions.append(
            {
                "requestId": request_id,
                "amount": f"{from_nanos(nanos):f}",
                "amount_nanos": nanos,
                "model": model,
                "endpoint": endpoint,
                "body_sha256": body_sha,
                "clientRequestId": client_request_id,
                "idempotencyKey": idempotency_key,
                "customId": custom_id,
                "batchId": batch_id,
                "at": time.time(),
            }
        )
        return request_id

    @property
    def charged_nanos(self) -> int:
        return sum(int(t["amount_nanos"]) for t in self.transactions)

    def delay(self, *, dry_run: bool = False) -> float:
        kind, a, b = self.dry_run_latency if dry_run else self.latency
        if kind == "uniform":
            return self.rng.uniform(a, b)
        if kind == "exp":
            return self.rng.expovariate(1 / a) if a > 0 else 0.0
        return a

    def pick_fault(self, body_text: str, *, dry_run: bool) -> str | None:
        here = "dry_run" if dry_run else "call"
        for i, item in enumerate(self.script):
            if item.target not in (here, "any"):
                continue
            if item.match is None or item.match in body_text:
                del self.script[i]
                return item.fault
        if not dry_run and self.fault_rate and self.rng.random() < self.fault_rate:
            return self.rng.choice(self.fault_kinds)
        return None

    def configure(self, settings: dict[str, Any]) -> None:
        """Apply a control request (POST /_sim/config) from a test in another process."""
        if "balance" in settings:
            self.balance_nanos = to_nanos(parse_usd(str(settings["balance"])))
        if "fault_rate" in settings:
            self.fault_rate = float(settings["fault_rate"])
        if "fault_kinds" in settings:
            self.fault_kinds = tuple(settings["fault_kinds"])
        if "retry_after_s" in settings:
            self.retry_after_s = float(settings["retry_after_s"])
        if "stall_s" in settings:
            self.stall_s = float(settings["stall_s"])
        if "latency" in settings:
            self.latency = parse_latency(settings["latency"])
        if "dry_run_latency" in settings:
            self.dry_run_latency = parse_latency(settings["dry_run_latency"])
        if "pricing" in settings:
            self.pricing = str(settings["pricing"])
        if "idempotent" in settings:
            self.idempotent = bool(settings["idempotent"])
        if "lists_transactions" in settings:
            self.lists_transactions = bool(settings["lists_transactions"])
        for knob in ("batch_duration", "batch_line_error_rate"):
            if knob in settings:
                setattr(self, knob, float(settings[knob]))
        if "batch_expire_fraction" in settings:
            value = settings["batch_expire_fraction"]
            self.batch_expire_fraction = None if value is None else float(value)
        if "batch_max_requests" in settings:
            self.batch_max_requests = int(settings["batch_max_requests"])
        for item in settings.get("script", []):
            self.script.append(ScriptedFault(**item))

    def stats(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "balance": f"{from_nanos(self.balance_nanos):f}",
            "charged": f"{from_nanos(self.charged_nanos):f}",
            "charged_nanos": self.charged_nanos,
            "transactions": len(self.transactions),
            "peak_in_flight": self.peak_in_flight,
            "batches_created": self.counters["batches_created"],
        }
