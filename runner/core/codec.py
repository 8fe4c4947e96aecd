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


def loads_exact(text: str | bytes) -> Any:
    """`loads` for what the user wrote: orjson reads an integer past 64 bits as a float, so a text
    with a run of 19 digits or more goes to the standard library, which keeps every digit."""
    if may_hold_long_integer(text):
        return json.loads(text)
    return loads(text)


def quick_loads(line: bytes) -> Any:
    """A job line read by orjson straight from its bytes, or UNREAD when that is not the whole story:
    a line orjson refuses (blank, a byte order mark, bad UTF-8, invalid JSON: `loads_exact` on the
    decoded text words what is wrong) or that may hold an integer orjson would round."""
    if may_hold_long_integer(line):
        return UNREAD
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return UNREAD


def may_hold_long_integer(text: str | bytes) -> bool:
    """Whether the text has a run of 19 or more ASCII digits. Most lines have fewer than 19 digits in
    all, which a count says in a sixth of the time the pattern search takes."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if len(data) - len(data.translate(None, _DIGITS)) < _LONG:
        return False
    return _LONG_DIGITS.search(data) is not None


UNREAD: Any = object()
_LONG = 19
_DIGITS = b"0123456789"
_LONG_DIGITS = re.compile(rb"[0-9]{19}")  # JSON numbers are ASCII digits (faster than \d)


__all__ = ["canonical", "dumps", "dumps_text", "loads", "loads_exact", "may_hold_long_integer", "quick_loads"]
