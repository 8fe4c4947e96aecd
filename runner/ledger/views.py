"""What the ledger gives back: small frozen records, never dicts read by string key."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, NamedTuple

from runner.ledger.tx import Hold


@dataclass(frozen=True, slots=True)
class BudgetView:
    id: int
    name: str
    limit_nanos: int
    spent_nanos: int
    reserved_nanos: int
    possibly_billed_nanos: int

    @property
    def remaining_nanos(self) -> int:
        """What can still be reserved: never below zero, even when charges above their quotes (a
        price file too low) took the budget past its limit."""
        return max(0, self.limit_nanos - self.spent_nanos - self.reserved_nanos - self.possibly_billed_nanos)

    @property
    def overspent_nanos(self) -> int:
        return max(0, self.spent_nanos + self.reserved_nanos + self.possibly_billed_nanos - self.limit_nanos)


@dataclass(frozen=True, slots=True)
class RunView:
    """A run as the ledger holds it, with its requests counted by state and what they cost."""

    id: str
    job_path: str
    budget_id: int
    provider: str
    state: str
    reason: str | None
    total: int
    created_at: datetime | None
    finished_at: datetime | None
    owner: str | None
    seen_at: datetime | None
    mode: str | None
    states: dict[str, int]
    spent_nanos: int


# the runs table's columns a RunView holds (the rest it counts from the requests)
RUN_COLUMNS = ", ".join(f.name for f in fields(RunView) if f.name not in ("states", "spent_nanos"))


@dataclass(frozen=True, slots=True)
class PartView:
    """A batch part of a run, as the ledger records it."""

    id: int
    run_id: str
    number: int
    state: str
    lines: int
    bytes: int
    digest: str
    file_id: str | None
    batch_id: str | None
    status: str | None
    completed: int
    failed: int
    cancel: bool
    created_at: datetime | None
    updated_at: datetime | None


PART_COLUMNS = ", ".join(f.name for f in fields(PartView))


class RequestRow(NamedTuple):
    id: int
    custom_id: str
    sha256: str
    state: str
    quote_nanos: int | None
    attempts: int
    worker_id: str | None = None  # the worker that claimed it


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of one request, written in the transaction that turns its reservation into a charge."""

    request_id: int
    price_nanos: int
    fields: dict[str, Any]
    hold: Hold | None = None  # what the request holds, when the caller knows (saves a read)


@dataclass
class ChargeCheck:
    """A run's requests against the provider's charges (`Ledger.check_charges`)."""

    matched: int = 0  # requests whose charges agree with the ledger
    charged: int = 0  # possibly billed requests the provider charged
    not_charged: int = 0  # possibly billed requests it did not
    mismatched: list[tuple[str, int, int]] = field(default_factory=list)  # (custom_id, ledger, provider)
    spent_nanos: int = 0  # what the ledger says the run spent, after resolving
