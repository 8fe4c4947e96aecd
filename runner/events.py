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


Event = Quoted | RequestFinished | Retrying | Notice
Listener = Callable[[Event], None]


def ignore(_event: Event) -> None:
    return None
