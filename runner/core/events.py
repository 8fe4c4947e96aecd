"""Small frozen events the core emits; progress displays and logs subscribe to them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Quoted:
    custom_id: str
    cached: bool
    known: bool


@dataclass(frozen=True, slots=True)
class RequestFinished:
    custom_id: str
    state: str  # ok | failed | possibly_billed
    price_nanos: int


@dataclass(frozen=True, slots=True)
class Retrying:
    custom_id: str
    attempt: int
    wait_s: float
    error: str


@dataclass(frozen=True, slots=True)
class Notice:
    message: str


@dataclass(frozen=True, slots=True)
class Phase:
    """A new phase begins: quoting (every line) or running (the requests still to send)."""

    name: str
    total: int


@dataclass(frozen=True, slots=True)
class Funds:
    """The budget as the ledger has it (all processes sharing it), emitted about once a second."""

    spent_nanos: int
    reserved_nanos: int
    possibly_billed_nanos: int
    remaining_nanos: int
    stalled: int = 0  # requests in flight far longer than the run's median call


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """A run's provider batches, after a look at them: those still open, their lines the provider
    counts completed and failed, the seconds to the next look, the deadline (a time.time())."""

    open: int
    completed: int
    failed: int
    next_look_s: float
    deadline: float | None = None


Event = Quoted | RequestFinished | Retrying | Notice | Phase | Funds | BatchStatus
Listener = Callable[[Event], None]


def ignore(_event: Event) -> None:
    return None
