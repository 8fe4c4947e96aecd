"""The hot-path JSON codec: orjson's values, the standard library's for what orjson refuses."""

import json
import math

import pytest

from runner.core import codec


@pytest.mark.parametrize(
    "value",
    [
        {"model": "m", "messages": [{"role": "user", "content": "héllo ☃"}], "temperature": 0.7},
        {"n": 2**63 - 1, "nested": [None, True, False, 1.5e-7]},
        [],
    ],
)
def test_dumps_round_trips_like_the_standard_library(value: object) -> None:
    encoded = codec.dumps(value)
    assert isinstance(encoded, bytes)
    assert json.loads(encoded) == value
    assert codec.loads(encoded) == value
    assert codec.dumps_text(value) == encoded.decode()


def test_what_orjson_refuses_to_encode_falls_back() -> None:
    huge = {"seed": 2**70, 3: "int key"}
    assert codec.dumps(huge) == json.dumps(huge, separators=(",", ":")).encode()


def test_what_orjson_refuses_to_decode_falls_back() -> None:
    assert math.isnan(codec.loads(b'{"x": NaN}')["x"])
    assert codec.loads('"\\ud800"') == "\ud800"


def test_invalid_json_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Expecting"):
        codec.loads(b"<html>bad gateway</html>")


def test_canonical_text_ignores_key_order() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.5}
    b = {"temperature": 0.5, "messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert codec.canonical(a) == codec.canonical(b)
    assert codec.canonical(a) != codec.canonical({**a, "temperature": 0.6})
    assert codec.canonical({"b": 2**70, "a": 1}) == codec.canonical({"a": 1, "b": 2**70})


def test_what_the_user_wrote_keeps_every_digit() -> None:
    line = '{"seed": 123456789012345678901234567890, "n": 1, "t": 0.25}'
    assert codec.loads_exact(line) == {"seed": 123456789012345678901234567890, "n": 1, "t": 0.25}
    assert codec.loads_exact('{"seed": -9999999999999999999}')["seed"] == -9999999999999999999
    assert codec.loads_exact('{"x": "1234567890123456789012 in a string"}')["x"].startswith("1234")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{"seed": 1234567890123456789}', True),  # 19 digits in a row
        (b'{"a": 123456789, "b": 1234567890}', False),  # 19 digits, but never 19 in a row
        (b'{"content": "call 555 0100, room 12, 2026-12-01"}', False),
        ('{"seed": 99999999999999999999}', True),  # text as well as bytes
        (b"", False),
    ],
)
def test_long_integer_runs_are_found_and_short_ones_let_through(text: str | bytes, expected: bool) -> None:
    assert codec.may_hold_long_integer(text) is expected


def test_quick_loads_reads_plain_lines_and_leaves_the_rest_to_the_careful_path() -> None:
    assert codec.quick_loads(b'{"model": "m", "n": 1}\r\n') == {"model": "m", "n": 1}
    assert codec.quick_loads(b"null") is None  # a JSON value that is not an object: read, judged later
    for left in [
        b'{"seed": 123456789012345678901234567890}',  # orjson would round it
        b'\xef\xbb\xbf{"model": "m"}',  # a byte order mark
        b'{"model": "\xff"}',  # not UTF-8
        b"   \n",  # blank
        b'{"model": ',  # not JSON
        b'{"x": "\\ud800"}',  # a lone surrogate, which the standard library reads
    ]:
        assert codec.quick_loads(left) is codec.UNREAD
