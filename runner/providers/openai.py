"""Any OpenAI-compatible endpoint (Baseten direct, vLLM, llama.cpp, OpenAI): quotes from a price table."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from runner.core import catalog, schema
from runner.core.catalog import ModelInfo
from runner.core.config import ProviderSettings, RetryPolicy, Timeouts
from runner.core.errors import ConfigError
from runner.core.models import ChatRequest, Outcome, Quote, Usage
from runner.providers import http, tokenize
from runner.providers.base import (
    HttpProvider,
    http_url,
    outcome_from,
    table_quote,
    usage_price,
    with_usage_option,
)
from runner.providers.batch import BatchClient
from runner.providers.connection import Connection, opened
from runner.providers.prices import price_table

CHAT_PATH = "chat/completions"  # relative to the base URL, which ends in /v1


class OpenAIProvider(HttpProvider):
    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str = "",
        prices: dict[str, ModelInfo] | None = None,
        max_connections: int = 256,
        timeouts: Timeouts = Timeouts(),
        count_prompts: bool = True,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        secret = http.Secret(api_key)
        endpoint = http.Endpoint(
            base_url, headers=headers, max_connections=max_connections, timeouts=timeouts, secret=secret
        )
        super().__init__(endpoint, secret)
        self.prices = prices if prices is not None else catalog.MODELS
        # the server's own count of a prompt, where it offers one (llama.cpp, vLLM, LiteLLM)
        root = http.Endpoint(
            tokenize.root_url(base_url),
            headers=headers,
            max_connections=max_connections,
            timeouts=timeouts,
            secret=secret,
        )
        self.counter: tokenize.PromptCounter | None = tokenize.PromptCounter(root) if count_prompts else None
        self.batches = BatchClient(endpoint, secret, self.prices, RetryPolicy())

    async def quote(self, request: ChatRequest) -> Quote:
        """The price table's bound, its prompt counted by the server where it can count one
        (`tokenized`: exact prompt tokens; the answer still bounded by max_tokens × choices)."""
        info = self.prices.get(request.model)
        if self.counter is None or info is None or info.input_price is None or info.output_price is None:
            return table_quote(request.body, info)
        prompt = await self.counter.count(request.body)
        if prompt is None:
            return table_quote(request.body, info)
        amount = prompt * info.input_price + schema.output_token_bound(request.body, info) * info.output_price
        return Quote(amount=amount, exact=False, source="tokenized")

    async def aclose(self) -> None:
        if self.counter is not None:
            await self.counter.aclose()
        await super().aclose()

    def price(self, model: str, usage: Usage) -> Any:
        return usage_price(usage, self.prices.get(model))

    async def complete(self, request: ChatRequest, headers: dict[str, str] | None = None) -> Outcome:
        started = time.perf_counter()
        if request.stream:
            body = with_usage_option(request.body)
            assembly, _, first = await self._send_stream(CHAT_PATH, body, headers)
            completion = assembly.completion()
            usage = Usage.from_openai(completion.get("usage"))
            return outcome_from(completion, self.price(request.model, usage), started, first, None)
        body = with_usage_option(request.body)
        _, payload = await self._send_json("POST", CHAT_PATH, body, billable=True, headers=headers)
        usage = Usage.from_openai(payload.get("usage"))
        return outcome_from(payload, self.price(request.model, usage), started, None, payload.get("id"))

    async def models(self) -> list[str]:
        _, payload = await self._send_json("GET", "models", billable=False)
        return sorted(str(m["id"]) for m in payload.get("data", []) if isinstance(m, dict))


@asynccontextmanager
async def connect(settings: ProviderSettings) -> AsyncIterator[Connection]:
    base = settings.base_url or os.environ.get("OPENAI_BASE_URL")
    if not base:
        msg = "set OPENAI_BASE_URL or --base-url for the openai provider"
        raise ConfigError(msg)
    base = http_url(base)
    provider = OpenAIProvider(
        base_url=base,
        api_key=settings.api_key or os.environ.get("OPENAI_API_KEY") or "",
        prices=price_table(settings),
        max_connections=settings.max_connections,
        timeouts=settings.timeouts,
    )
    async with opened(provider, f"openai:{base}", batches=provider.batches) as conn:
        yield conn
