"""The prompt counted by the server: each way (llama.cpp's is tested on the real server in
tests/test_llama.py) probed once, each distinct prompt counted once, and the byte bound kept where no
way answers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web

from runner.core import catalog
from runner.core.models import ChatRequest
from runner.providers.openai import OpenAIProvider

Serve = Callable[[web.Application], Awaitable[str]]
PRICES = {"m": catalog.ModelInfo("m", 4096, False, False, Decimal("0.000001"), Decimal("0.000002"))}


def request(text: str, max_tokens: int = 10) -> ChatRequest:
    body = {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}
    return ChatRequest("job.jsonl", 1, text, body, {}, text)


def server(kind: str, seen: Counter[str]) -> web.Application:
    """A stand-in with one server's way of counting: vLLM's /tokenize, LiteLLM's token counter, or
    none at all (every other path 404s)."""

    async def vllm(req: web.Request) -> web.Response:
        body = await req.json()
        seen[body["messages"][-1]["content"]] += 1
        assert body["add_generation_prompt"] is True and body["model"] == "m"
        return web.json_response(
            {"count": 7 + len(body["messages"][-1]["content"]), "tokens": [], "max_model_len": 4096}
        )

    async def litellm(req: web.Request) -> web.Response:
        body = await req.json()
        seen[body["messages"][-1]["content"]] += 1
        return web.json_response(
            {"total_tokens": 5, "request_model": "m", "model_used": "m", "tokenizer_type": "x"}
        )

    app = web.Application()
    if kind == "vllm":
        app.router.add_post("/tokenize", vllm)
    elif kind == "litellm":
        app.router.add_post("/utils/token_counter", litellm)
    return app


@pytest.mark.parametrize(("kind", "prompt_tokens"), [("vllm", 7 + 5), ("litellm", 5)])
async def test_vllm_and_litellm_count_the_prompt_once_per_distinct_prompt(
    serve_app: Serve, kind: str, prompt_tokens: int
) -> None:
    seen: Counter[str] = Counter()
    provider = OpenAIProvider(base_url=await serve_app(server(kind, seen)) + "/v1", prices=PRICES)
    try:
        quotes = [await provider.quote(request("hello", n)) for n in (10, 20, 10)]
    finally:
        await provider.aclose()
    assert {q.source for q in quotes} == {"tokenized"}
    assert quotes[0].amount == prompt_tokens * Decimal("0.000001") + 10 * Decimal("0.000002")
    assert quotes[1].amount == prompt_tokens * Decimal("0.000001") + 20 * Decimal("0.000002")
    assert seen["hello"] == 1  # the same prompt (whatever max_tokens) counted once
    assert (
        provider.counter is not None and provider.counter.kind == {"vllm": "vLLM", "litellm": "LiteLLM"}[kind]
    )


async def test_a_server_with_no_way_to_count_keeps_the_byte_bound(serve_app: Serve) -> None:
    seen: Counter[str] = Counter()
    provider = OpenAIProvider(base_url=await serve_app(server("none", seen)) + "/v1", prices=PRICES)
    try:
        quotes: list[Any] = [await provider.quote(request("hello")) for _ in range(3)]
    finally:
        await provider.aclose()
    assert {q.source for q in quotes} == {"price_table"}
    assert provider.counter is not None and provider.counter.kind is None
