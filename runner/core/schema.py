"""The chat-completions request contract of the Run API (44 fields) as data, plus the checks.

`check_body` returns every problem of one request body as (field, message) pairs; it never raises.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from runner.core import catalog, codec
from runner.core.catalog import ModelInfo
from runner.core.errors import printable

Problem = tuple[str, str]
Extra = Callable[[Any, dict[str, Any], "Context"], Iterator[Problem]]

ROLES = ("system", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")
TOOL_CHOICES = ("none", "auto", "required")
FORMATS = ("text", "json_object", "json_schema")
PART_TYPES = ("text", "image_url", "input_audio", "file")
MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "reasoning"}
)
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
BYTES_PER_TOKEN = 3  # conservative: real tokenizers average about 4 bytes per token
TOKENS_PER_MESSAGE = 8  # chat-template overhead per message, rounded up


@dataclass(frozen=True, slots=True)
class Context:
    models: dict[str, ModelInfo]


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: str  # number | integer | boolean | string | object | array | any
    minimum: float | None = None
    maximum: float | None = None
    extra: Extra | None = None


_KIND_TEST: dict[str, Callable[[Any], bool]] = {
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}
_KIND_NAME = {
    "number": "a number",
    "integer": "an integer",
    "boolean": "true or false",
    "string": "a string",
    "object": "an object",
    "array": "an array",
}


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# ---- field-specific checks -------------------------------------------------------------------


def _check_model(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if value not in ctx.models:
        yield "model", f"unknown model '{value}'{_suggest(value, ctx.models)} (see `runner models`)"


def _check_content_parts(where: str, parts: list[Any]) -> Iterator[Problem]:
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            yield at, f"{_show(part)} is not a content part object"
        elif part.get("type") not in PART_TYPES:
            yield f"{at}.type", f"{_show(part.get('type'))} is not one of {', '.join(PART_TYPES)}"
        elif part["type"] == "text" and not isinstance(part.get("text"), str):
            yield f"{at}.text", "a text part needs a string 'text'"
        elif part["type"] == "image_url" and not isinstance(part.get("image_url"), dict | str):
            yield f"{at}.image_url", "an image_url part needs an 'image_url' object"


def _check_tool_call(where: str, call: Any) -> Iterator[Problem]:
    if not isinstance(call, dict):
        yield where, "a tool call must be an object"
        return
    if not isinstance(call.get("id"), str):
        yield f"{where}.id", "a tool call needs a string 'id'"
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        yield f"{where}.function", "a tool call needs a function with a 'name'"
    elif not isinstance(function.get("arguments", ""), str):
        yield f"{where}.function.arguments", "arguments must be a JSON string"


def _check_message(i: int, message: Any) -> Iterator[Problem]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        yield where, f"{_show(message)} is not a message object"
        return
    role = message.get("role")
    if role not in ROLES:
        yield f"{where}.role", f"{_show(role)} is not one of {', '.join(ROLES)}"
        return
    for key in message.keys() - MESSAGE_KEYS:
        yield f"{where}.{key}", f"unknown message field{_suggest(key, MESSAGE_KEYS)}"
    content = message.get("content")
    tool_calls = message.get("tool_calls")
    if content is None:
        if not (role == "assistant" and tool_calls):
            yield f"{where}.content", f"a {role} message needs content"
    elif isinstance(content, list):
        yield from _check_content_parts(where, content)
    elif not isinstance(content, str):
        yield f"{where}.content", "content must be a string or a list of content parts"
    if tool_calls is not None:
        if role != "assistant":
            yield f"{where}.tool_calls", "only an assistant message may carry tool_calls"
        elif not isinstance(tool_calls, list) or not tool_calls:
            yield f"{where}.tool_calls", "tool_calls must be a non-empty array"
        else:
            for j, call in enumerate(tool_calls):
                yield from _check_tool_call(f"{where}.tool_calls[{j}]", call)
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        yield f"{where}.tool_call_id", "a tool message needs the tool_call_id it answers"


def _check_messages(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if not value:
        yield "messages", "at least one message is required"
    for i, message in enumerate(value):
        yield from _check_message(i, message)


def _check_logit_bias(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    for token, bias in value.items():
        if not token.lstrip("-").isdigit():
            yield f"logit_bias.{token}", "keys must be token ids"
        elif not _KIND_TEST["number"](bias):
            yield f"logit_bias.{token}", f"{_show(bias)} is not a number"
        elif not -100 <= bias <= 100:
            yield f"logit_bias.{token}", f"{bias} is outside the range -100..100"


def _check_top_logprobs(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if body.get("logprobs") is not True:
        yield "top_logprobs", "requires logprobs: true"


def _only_one(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if value != 1:
        yield "", f"{value} is not supported: only 1"


def _check_response_format(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    kind = value.get("type")
    if kind not in FORMATS:
        yield "response_format.type", f"{_show(kind)} is not one of {', '.join(FORMATS)}"
    elif kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            yield "response_format.json_schema", "json_schema needs a 'json_schema' object"
        elif not isinstance(spec.get("name"), str):
            yield "response_format.json_schema.name", "a json_schema needs a string 'name'"
        elif not isinstance(spec.get("schema"), dict):
            yield "response_format.json_schema.schema", "a json_schema needs a 'schema' object"
        elif problem := _schema_problem(codec.dumps_text(spec["schema"])):
            yield "response_format.json_schema.schema", problem


@functools.lru_cache(maxsize=256)
def _schema_problem(text: str) -> str | None:
    """Why a JSON Schema is not one (jsonschema's own check, for the draft it names); None when it
    is. Keyed by the schema's text: a job's lines share a few schemas."""
    import jsonschema  # noqa: PLC0415 - loaded only for a job that asks for a schema

    schema = json.loads(text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        reason = printable(exc.message if len(exc.message) <= 120 else exc.message[:117] + "...")
        return f"not a valid JSON Schema{f' at {where}' if where else ''}: {reason}"
    return None


def _check_stop(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        yield "stop", "must be a string or an array of strings"
    elif len(value) > 4:
        yield "stop", f"{len(value)} sequences given; at most 4"


def _check_stream_options(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if body.get("stream") is not True:
        yield "stream_options", "only allowed with stream: true"
    if "include_usage" in value and not isinstance(value["include_usage"], bool):
        yield "stream_options.include_usage", "must be true or false"


def _check_tools(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            yield f"{where}.type", "each tool must be {'type': 'function', 'function': {...}}"
            continue
        function = tool.get("function")
        if not isinstance(function, dict):
            yield f"{where}.function", "a function definition object is required"
            continue
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            yield f"{where}.function.name", f"{_show(name)} must match [A-Za-z0-9_-]{{1,64}}"
        params = function.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type") != "object"):
            yield f"{where}.function.parameters", "must be a JSON schema with type 'object'"


def _tool_names(body: dict[str, Any]) -> set[str]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return set()
    return {
        str(t["function"].get("name"))
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    }


def _check_tool_choice(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            yield "tool_choice", f"{_show(value)} is not one of {', '.join(TOOL_CHOICES)}"
        elif value == "required" and not body.get("tools"):
            yield "tool_choice", "'required' needs tools"
        return
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(function, dict):
        yield "tool_choice", "must be none|auto|required or {'type': 'function', 'function': {...}}"
    elif function.get("name") not in _tool_names(body):
        yield "tool_choice.function.name", f"{_show(function.get('name'))} is not among the tools"


def _check_top_k(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if value < 1 and value != -1:
        yield "top_k", f"{value} is invalid: at least 1, or -1 to disable"


def _check_min_tokens(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    limit = body.get("max_tokens", catalog.DEFAULT_MAX_TOKENS)
    if isinstance(limit, int) and value > limit:
        yield "min_tokens", f"{value} is above max_tokens ({limit})"


def _check_token_ids(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        yield "", "must be an array of non-negative token ids"


def _check_documents(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    for i, document in enumerate(value):
        if not isinstance(document, dict):
            yield f"documents[{i}]", "each document must be an object"


def _check_effort(value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if value not in EFFORTS:
        yield "reasoning_effort", f"{_show(value)} is not one of {', '.join(EFFORTS)}"
        return
    info = ctx.models.get(str(body.get("model")))
    if info is not None and not info.reasoning_effort:
        yield "reasoning_effort", f"model '{info.slug}' does not support reasoning_effort"


F = Field
FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        F("messages", "array", extra=_check_messages),
        F("model", "string", extra=_check_model),
        F("frequency_penalty", "number", -2, 2),
        F("logit_bias", "object", extra=_check_logit_bias),
        F("logprobs", "boolean"),
        F("top_logprobs", "integer", 0, 20, extra=_check_top_logprobs),
        F("max_tokens", "integer", 1),
        F("n", "integer", extra=_only_one),
        F("presence_penalty", "number", -2, 2),
        F("response_format", "object", extra=_check_response_format),
        F("seed", "integer"),
        F("stop", "any", extra=_check_stop),
        F("stream", "boolean"),
        F("stream_options", "object", extra=_check_stream_options),
        F("temperature", "number", 0, 4),
        F("top_p", "number", 0, 1),
        F("tools", "array", extra=_check_tools),
        F("tool_choice", "any", extra=_check_tool_choice),
        F("parallel_tool_calls", "boolean"),
        F("user", "string"),
        F("top_k", "integer", extra=_check_top_k),
        F("top_p_min", "number", 0, 1),
        F("min_p", "number", 0, 1),
        F("repetition_penalty", "number", 0.01, 10),
        F("length_penalty", "number"),
        F("early_stopping", "boolean"),
        F("bad", "string"),
        F("bad_token_ids", "array", extra=_check_token_ids),
        F("stop_token_ids", "array", extra=_check_token_ids),
        F("include_stop_str_in_output", "boolean"),
        F("ignore_eos", "boolean"),
        F("min_tokens", "integer", 0, extra=_check_min_tokens),
        F("skip_special_tokens", "boolean"),
        F("spaces_between_special_tokens", "boolean"),
        F("truncate_prompt_tokens", "integer", 1),
        F("echo", "boolean"),
        F("add_generation_prompt", "boolean"),
        F("add_special_tokens", "boolean"),
        F("documents", "array", extra=_check_documents),
        F("chat_template", "string"),
        F("chat_template_args", "object"),
        F("best_of", "integer", extra=_only_one),
        F("disaggregated_params", "object"),
        F("reasoning_effort", "string", extra=_check_effort),
    )
}
REQUIRED = ("model", "messages")


def _check_field(spec: Field, value: Any, body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    if not _KIND_TEST[spec.kind](value):
        yield spec.name, f"{_show(value)} is not {_KIND_NAME[spec.kind]}"
        return
    if spec.minimum is not None and value < spec.minimum:
        yield spec.name, f"{_show(value)} is below the minimum {float(spec.minimum)}"
        return
    if spec.maximum is not None and value > spec.maximum:
        yield spec.name, f"{_show(value)} is above the maximum {float(spec.maximum)}"
        return
    if spec.extra is not None:
        for where, message in spec.extra(value, body, ctx):
            yield where or spec.name, message


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A conservative (high) estimate of the prompt's tokens: bytes / 3 plus template overhead."""
    size = 0
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            size += len(content.encode())
        elif content is not None:
            size += len(json.dumps(content, ensure_ascii=False).encode())
        if isinstance(message, dict) and message.get("tool_calls"):
            size += len(json.dumps(message["tool_calls"]).encode())
    if body.get("tools"):
        size += len(json.dumps(body["tools"]).encode())
    return -(-size // BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE * count


def max_output_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_tokens")
    return value if isinstance(value, int) and value > 0 else catalog.DEFAULT_MAX_TOKENS


# every field whose text a chat template can put before the model (a user's template included)
PROMPT_FIELDS = ("messages", "tools", "tool_choice", "response_format", "documents", "chat_template")


def prompt_token_bound(body: dict[str, Any], info: ModelInfo) -> int:
    """More prompt tokens than any byte-level tokenizer can make of the request: the UTF-8 bytes of
    the text it carries (counted as JSON, which only adds bytes), plus the template's allowance per
    message and per request."""
    carried = {name: body[name] for name in PROMPT_FIELDS if name in body}
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    return len(codec.dumps(carried)) + info.per_request_tokens + info.per_message_tokens * count


def output_token_bound(body: dict[str, Any], info: ModelInfo, *, default: int | None = None) -> int:
    """The most tokens the answer can have: max_tokens (else `default`, else the context window, else
    the contract's default), times the choices asked for (`n`, `best_of`)."""
    limit = body.get("max_tokens")
    if not (isinstance(limit, int) and limit > 0):
        limit = default or info.context_window or catalog.DEFAULT_MAX_TOKENS
    choices = [v for v in (body.get("n"), body.get("best_of")) if isinstance(v, int) and v > 1]
    return limit * max(choices, default=1)


def _check_context(body: dict[str, Any], ctx: Context) -> Iterator[Problem]:
    info = ctx.models.get(str(body.get("model")))
    if info is None or info.context_window is None:  # not known: a model priced by a price file alone
        return
    prompt = estimate_prompt_tokens(body)
    wanted = prompt + max_output_tokens(body)
    if wanted > info.context_window:
        yield (
            "messages",
            (
                f"the prompt (estimated {prompt:,} tokens, a conservative estimate) "
                f"plus max_tokens "
                f"({max_output_tokens(body):,}) exceeds {info.slug}'s context window of "
                f"{info.context_window:,} tokens"
            ),
        )


def check_body(body: dict[str, Any], models: dict[str, ModelInfo] | None = None) -> list[Problem]:
    """Every problem of one chat-completions body, as (field, message) pairs."""
    ctx = Context(models if models is not None else catalog.MODELS)
    problems: list[Problem] = [(name, "is required") for name in REQUIRED if name not in body]
    for name, value in body.items():
        spec = FIELDS.get(name)
        if spec is None:
            problems.append((name, f"unknown field{_suggest(name, FIELDS)}"))
        else:
            problems.extend(_check_field(spec, value, body, ctx))
    if not problems:
        problems.extend(_check_context(body, ctx))
    return problems
