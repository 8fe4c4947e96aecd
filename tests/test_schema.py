"""Accept and reject cases for every one of the 44 request fields."""

from __future__ import annotations

from typing import Any

import pytest

from runner.core import schema

BASE: dict[str, Any] = {
    "model": "deepseek-ai/DeepSeek-V3.1",
    "messages": [{"role": "user", "content": "hi"}],
}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]

# field -> (accepted values, rejected values with a fragment of the expected message)
CASES: dict[str, tuple[list[Any], list[tuple[Any, str]]]] = {
    "messages": (
        [
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "x"}]},
            ]
        ],
        [
            ([], "at least one"),
            ("hi", "not an array"),
            ([{"role": "robot", "content": "x"}], "not one of system"),
        ],
    ),
    "model": (["openai/gpt-oss-120b"], [("gpt-5", "unknown model"), (3, "not a string")]),
    "frequency_penalty": ([-2, 0, 2.0], [(2.5, "above the maximum 2.0"), ("1", "not a number")]),
    "logit_bias": (
        [{"50256": -100, "11": 5.5}],
        [({"x": 1}, "token ids"), ({"1": 101}, "-100..100")],
    ),
    "logprobs": ([True, False], [("yes", "true or false"), (1, "true or false")]),
    "max_tokens": ([1, 4096], [(0, "below the minimum 1.0"), (1.5, "not an integer")]),
    "n": ([1], [(2, "only 1"), ("1", "not an integer")]),
    "presence_penalty": ([-2, 1.5], [(-2.1, "below the minimum -2.0"), (None, "not a number")]),
    "response_format": (
        [
            {"type": "text"},
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        ],
        [
            ({"type": "xml"}, "not one of"),
            ({"type": "json_schema"}, "json_schema"),
            ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
            (
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}},
                "not a valid JSON Schema at type: 'banana' is not valid",
            ),
            (
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"required": "a"}}},
                "not a valid JSON Schema at required",
            ),
        ],
    ),
    "seed": ([0, 42, -1], [(1.5, "not an integer"), ("42", "not an integer")]),
    "stop": (
        ["\n", ["a", "b", "c", "d"]],
        [(["a", "b", "c", "d", "e"], "at most 4"), (5, "string")],
    ),
    "stream": ([True, False], [("true", "true or false")]),
    "temperature": (
        [0, 1, 4],
        [(5.2, "5.2 is above the maximum 4.0"), (-0.1, "below the minimum")],
    ),
    "top_p": ([0, 0.5, 1], [(1.1, "above the maximum 1.0"), ("0.5", "not a number")]),
    "tools": (
        [TOOLS],
        [
            ([{"type": "function"}], "function definition"),
            ([{"type": "web"}], "type"),
            ([{"type": "function", "function": {"name": "bad name!"}}], "must match"),
            (
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
                "type 'object'",
            ),
        ],
    ),
    "parallel_tool_calls": ([True], [("no", "true or false")]),
    "user": (["user-1"], [(12, "not a string")]),
    "top_k": ([1, 50, -1], [(0, "at least 1"), (-2, "at least 1"), (2.5, "not an integer")]),
    "top_p_min": ([0, 0.3], [(1.5, "above the maximum")]),
    "min_p": ([0.05], [(-0.1, "below the minimum")]),
    "repetition_penalty": ([1.1, 0.9], [(0, "below the minimum"), ("1", "not a number")]),
    "length_penalty": ([1.0, -0.5], [("long", "not a number")]),
    "early_stopping": ([False], [("no", "true or false")]),
    "bad": (["darn"], [(["darn"], "not a string")]),
    "bad_token_ids": ([[1, 2]], [([1, -2], "token ids"), ("1", "not an array")]),
    "stop_token_ids": ([[2]], [(["x"], "token ids")]),
    "include_stop_str_in_output": ([True], [(1, "true or false")]),
    "ignore_eos": ([False], [(0, "true or false")]),
    "min_tokens": ([0, 10], [(-1, "below the minimum"), (5000, "above max_tokens")]),
    "skip_special_tokens": ([True], [("true", "true or false")]),
    "spaces_between_special_tokens": ([True], [(None, "true or false")]),
    "truncate_prompt_tokens": ([100], [(0, "below the minimum")]),
    "echo": ([False], [("false", "true or false")]),
    "add_generation_prompt": ([True], [(2, "true or false")]),
    "add_special_tokens": ([True], [([], "true or false")]),
    "documents": ([[{"title": "a", "text": "b"}]], [(["plain"], "object"), ({}, "not an array")]),
    "chat_template": (["{{ messages }}"], [({}, "not a string")]),
    "chat_template_args": ([{"enable_thinking": True}], [("x", "not an object")]),
    "best_of": ([1], [(3, "only 1")]),
    "disaggregated_params": ([{"mode": "x"}], [([], "not an object")]),
    "reasoning_effort": (["low", "medium", "high"], [("max", "not one of")]),
}
# fields whose valid values need a companion field in the body
COMPANIONS: dict[str, dict[str, Any]] = {
    "top_logprobs": {"logprobs": True},
    "stream_options": {"stream": True},
    "tool_choice": {"tools": TOOLS},
}
CASES["top_logprobs"] = ([0, 20], [(21, "above the maximum 20.0"), (-1, "below the minimum")])
CASES["stream_options"] = ([{"include_usage": True}], [({"include_usage": "y"}, "true or false")])
CASES["tool_choice"] = (
    ["none", "auto", "required", {"type": "function", "function": {"name": "f"}}],
    [("always", "not one of"), ({"type": "function", "function": {"name": "g"}}, "not among")],
)


def test_every_field_of_the_contract_has_cases() -> None:
    assert len(schema.FIELDS) == 44
    assert set(CASES) == set(schema.FIELDS)


def _accepted() -> list[tuple[str, Any]]:
    return [(name, value) for name, (good, _) in CASES.items() for value in good]


def _rejected() -> list[tuple[str, Any, str]]:
    return [(name, value, frag) for name, (_, bad) in CASES.items() for value, frag in bad]


@pytest.mark.parametrize(("field", "value"), _accepted())
def test_field_accepts(field: str, value: Any) -> None:
    body = {**BASE, **COMPANIONS.get(field, {}), field: value}
    assert schema.check_body(body) == []


@pytest.mark.parametrize(("field", "value", "fragment"), _rejected())
def test_field_rejects(field: str, value: Any, fragment: str) -> None:
    body = {**BASE, **COMPANIONS.get(field, {}), field: value}
    problems = schema.check_body(body)
    assert problems, f"{field}={value!r} was accepted"
    assert any(where.startswith(field) and fragment in msg for where, msg in problems), problems


@pytest.mark.parametrize(
    ("extra", "field", "fragment"),
    [
        ({"top_logprobs": 3}, "top_logprobs", "requires logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"max_tokens": 10, "min_tokens": 11}, "min_tokens", "above max_tokens (10)"),
        (
            {"model": "openai/gpt-oss-120b", "reasoning_effort": "low"},
            "reasoning_effort",
            "does not support",
        ),
        ({"temprature": 1}, "temprature", "did you mean 'temperature'"),
    ],
)
def test_cross_field_rules(extra: dict[str, Any], field: str, fragment: str) -> None:
    problems = schema.check_body({**BASE, **extra})
    assert any(w == field and fragment in m for w, m in problems), problems


@pytest.mark.parametrize(
    ("messages", "field", "fragment"),
    [
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id", "tool_call_id"),
        ([{"role": "user"}], "messages[0].content", "needs content"),
        ([{"role": "user", "content": 3}], "messages[0].content", "string or a list"),
        (
            [{"role": "user", "content": "x", "tool_calls": [{}]}],
            "messages[0].tool_calls",
            "assistant",
        ),
        (
            [{"role": "user", "content": [{"type": "video"}]}],
            "messages[0].content[0].type",
            "not one of",
        ),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
            "messages[0].tool_calls[0].function",
            "name",
        ),
        (
            [{"role": "user", "content": "x", "nmae": "a"}],
            "messages[0].nmae",
            "did you mean 'name'",
        ),
        (["hi"], "messages[0]", "not a message object"),
    ],
)
def test_message_structure(messages: list[Any], field: str, fragment: str) -> None:
    problems = schema.check_body({**BASE, "messages": messages})
    assert any(w == field and fragment in m for w, m in problems), problems


def test_assistant_may_carry_tool_calls_instead_of_content() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    assert schema.check_body({**BASE, "messages": messages}) == []


def test_missing_required_fields() -> None:
    problems = schema.check_body({})
    assert ("model", "is required") in problems
    assert ("messages", "is required") in problems


def test_prompt_that_does_not_fit_the_context_window() -> None:
    huge = "word " * 200_000  # 1 MB: about 333k estimated tokens
    body = {**BASE, "messages": [{"role": "user", "content": huge}]}
    [(field, message)] = schema.check_body(body)
    assert field == "messages"
    assert "estimate" in message
    assert "163,840" in message


def test_max_tokens_counts_against_the_context_window() -> None:
    body = {**BASE, "max_tokens": 163_840}
    [(field, message)] = schema.check_body(body)
    assert field == "messages" and "max_tokens (163,840)" in message
