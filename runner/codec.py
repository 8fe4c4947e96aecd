"""JSON on the hot path: orjson, with the standard library for what orjson refuses.

A request body is encoded and a reply decoded once per call, and a completion is stored as text once
per settled request: with the standard library that was a fifth of the event loop's time at a few
thousand requests a second. orjson gives the same values for what the APIs send; the fallbacks keep
the standard library's behaviour for the rest (integers past 64 bits, NaN, lone surrogates).
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits, a non-string key, a type orjson does not know
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def canonical(value: Any) -> bytes:
    """One text per value whatever its key order: what a request's hash is taken of."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def dumps_text(value: Any) -> str:
    return dumps(value).decode()


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # the standard library accepts a little more, and words its errors
        return json.loads(data)


def loads_exact(text: str) -> Any:
    """`loads` for what the user wrote: orjson reads an integer past 64 bits as a float, so a text
    with a run of 19 digits or more goes to the standard library, which keeps every digit."""
    if _LONG_DIGITS.search(text):
        return json.loads(text)
    return loads(text)


_LONG_DIGITS = re.compile(r"[0-9]{19}")  # JSON numbers are ASCII digits (faster than \d)


__all__ = ["canonical", "dumps", "dumps_text", "loads", "loads_exact"]
