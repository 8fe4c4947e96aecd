"""Exact money: Decimal in Python, integer nano-USD (1e-9 USD) in storage. Never a float."""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
_NANO = Decimal("0.000000001")


def parse_usd(text: str | int | Decimal) -> Decimal:
    """Read a USD amount from a decimal string (as the Run API sends `price`)."""
    if isinstance(text, float):  # a float has already lost the exact value
        msg = "money must be given as a decimal string, never a float"
        raise TypeError(msg)
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        msg = f"not a decimal amount: {text!r}"
        raise ValueError(msg) from None
    if not value.is_finite() or value < 0:
        msg = f"not a non-negative amount: {text!r}"
        raise ValueError(msg)
    return value


def to_nanos(amount: Decimal, *, round_up: bool = False) -> int:
    """Decimal USD → integer nano-USD; reservations round up so they always cover the charge."""
    rounding = ROUND_CEILING if round_up else ROUND_HALF_EVEN
    return int(amount.quantize(_NANO, rounding=rounding) * NANOS_PER_USD)


def from_nanos(nanos: int) -> Decimal:
    return (Decimal(nanos) / NANOS_PER_USD).quantize(_NANO)


def format_usd(amount: Decimal | int | None, *, places: int = 4) -> str:
    """Human form: `$1.2345`; nano-USD ints are accepted; None is `unknown`."""
    if amount is None:
        return "unknown"
    value = from_nanos(amount) if isinstance(amount, int) else amount
    if value != 0 and abs(value) < Decimal(1).scaleb(-places):
        return f"${value.normalize():f}"
    return f"${value.quantize(Decimal(1).scaleb(-places)):,f}"
