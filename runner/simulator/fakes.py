"""Deterministic fake completions, seeded by the request body: clearly fake, protocol-exact."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from runner.core import schema
from runner.core.catalog import ModelInfo

WORDS = [
    "simulated",
    "reply",
    "lorem",
    "ipsum",
    "tide",
    "glacier",
    "honey",
    "compiler",
    "photon",
    "orbit",
    "river",
    "lantern",
    "meadow",
    "quartz",
    "ember",
    "harbor",
    "violet",
    "signal",
    "canyon",
    "pebble",
    "thunder",
    "copper",
    "willow",
]
EFFORT_TOKENS = {"low": 16, "medium": 48, "high": 96}
BYTES_PER_TOKEN = 4  # the simulator's tokenizer: fewer tokens than runner's conservative estimate
TOKENS_PER_MESSAGE = 4


@dataclass
class Fake:
    """One generated answer, before it is put on the wire."""

    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


def seed_of(body: dict[str, Any]) -> int:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big")


def prompt_tokens(body: dict[str, Any]) -> int:
    size = 0
    messages = body.get("messages") or []
    for message in messages:
        content = message.get("content")
        if content is not None:
            size += len((content if isinstance(content, str) else json.dumps(content)).encode())
    if body.get("tools"):
        size += len(json.dumps(body["tools"]).encode())
    return -(-size // BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages)


def _words(rng: random.Random, count: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(count)]


def instance_of(spec: Any, rng: random.Random, depth: int = 0) -> Any:
    """A value that matches a (simple) JSON schema."""
    if not isinstance(spec, dict):
        return "simulated"
    if spec.get("enum"):
        return spec["enum"][0]
    kind = spec.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        props = spec.get("properties") or {}
        if depth > 4:
            return {}
        return {name: instance_of(sub, rng, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [instance_of(spec.get("items") or {"type": "string"}, rng, depth + 1) for _ in range(2)]
    if kind == "integer":
        return rng.randint(0, 9)
    if kind == "number":
        return rng.randint(0, 99) / 4
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return " ".join(_words(rng, 3))


def _forced_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not tools or choice in (None, "none", "auto"):
        return None
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name")
        return next((t["function"] for t in tools if t["function"].get("name") == name), None)
    return dict(tools[0]["function"])


def sampled(body: dict[str, Any]) -> bool:
    """Whether a model would sample this body afresh each call: a temperature above 0 and no seed
    (the simulator's answers then vary between calls; otherwise the body decides them)."""
    temperature = body.get("temperature")
    return isinstance(temperature, int | float) and temperature > 0 and body.get("seed") is None


def generate(body: dict[str, Any], model: ModelInfo | None) -> Fake:
    rng = random.Random() if sampled(body) else random.Random(seed_of(body))
    budget = schema.max_output_tokens(body)
    fake = Fake(content=None, reasoning=None, prompt_tokens=prompt_tokens(body))
    reasoning_tokens = 0
    if model is not None and model.reasons:
        reasoning_tokens = min(budget // 2, EFFORT_TOKENS[body.get("reasoning_effort", "medium")])
        if reasoning_tokens:
            fake.reasoning = "[simulated reasoning] " + " ".join(_words(rng, reasoning_tokens))
    room = budget - reasoning_tokens
    tool = _forced_tool(body)
    if tool is not None:
        arguments = json.dumps(instance_of(tool.get("parameters") or {"type": "object"}, rng))
        fake.tool_calls = [
            {
                "id": f"call_sim_{rng.getrandbits(32):08x}",
                "type": "function",
                "function": {"name": tool["name"], "arguments": arguments},
            }
        ]
        answer_tokens = min(room, max(1, len(arguments) // BYTES_PER_TOKEN))
        fake.finish_reason = "tool_calls"
    else:
        fake.content, answer_tokens, fake.finish_reason = _answer(body, rng, room)
    fake.reasoning_tokens = reasoning_tokens
    fake.completion_tokens = reasoning_tokens + answer_tokens
    return fake


def _answer(body: dict[str, Any], rng: random.Random, room: int) -> tuple[str, int, str]:
    fmt = (body.get("response_format") or {}).get("type", "text")
    if fmt == "json_schema":
        schema_spec = body["response_format"]["json_schema"].get("schema") or {}
        text = json.dumps(instance_of(schema_spec, rng))
        return text, min(room, max(1, len(text) // BYTES_PER_TOKEN)), "stop"
    if fmt == "json_object":
        text = json.dumps({"answer": " ".join(_words(rng, 4)), "simulated": True})
        return text, min(room, max(1, len(text) // BYTES_PER_TOKEN)), "stop"
    wanted = rng.randint(12, 80)
    count = min(room, wanted)
    words = _words(rng, count)
    if rng.random() < 0.3 and len(words) > 6:
        words[len(words) // 2] += "\n\n"
    text = "[simulated] " + " ".join(words)
    finish = "length" if wanted > room else "stop"
    stops = body.get("stop")
    for stop in [stops] if isinstance(stops, str) else stops or []:
        cut = text.find(stop)
        if stop and cut >= 0:
            text = text[:cut] + (stop if body.get("include_stop_str_in_output") else "")
            count = min(count, len(text.split()))
            finish = "stop"
    return text, count, finish
