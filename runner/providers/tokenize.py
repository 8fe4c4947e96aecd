"""A request's prompt counted by the server's own tokenizer and chat template, where the server offers
a way: llama.cpp's server (`/apply-template`, then `/tokenize` of the text it gives), vLLM (`/tokenize`
with the messages) and LiteLLM's proxy (`/utils/token_counter`). The endpoint is probed once; each
distinct prompt is counted once (kept for the process). Where none answers, quotes keep the byte bound.
"""

from __future__ import annotations

import hashlib
from typing import Any

import anyio

from runner.core import codec
from runner.core.models import JSON
from runner.providers import http

# what of a body the prompt is made of (the rest changes the answer, not the prompt's tokens)
PROMPT_FIELDS = ("model", "messages", "tools", "tool_choice", "response_format", "chat_template_kwargs")
PROBE = [{"role": "user", "content": "hi"}]
LLAMA, VLLM, LITELLM = "llama.cpp", "vLLM", "LiteLLM"


def root_url(base_url: str) -> str:
    """The server's root: these endpoints are not under /v1."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


class PromptCounter:
    """One endpoint's way of counting prompts (found by `probe`), and the prompts counted so far."""

    def __init__(self, endpoint: http.Endpoint) -> None:
        self._endpoint = endpoint
        self.kind: str | None = None  # which server's way answered
        self._probed = False
        self._lock = anyio.Lock()
        self._counts: dict[str, int] = {}

    async def aclose(self) -> None:
        await self._endpoint.aclose()

    async def _post(self, path: str, body: JSON) -> Any:
        """The reply's JSON, or None when the server has no such endpoint or refuses the body."""
        try:
            reply = await self._endpoint.call("POST", path, body)
        except http.NetworkError:
            return None
        if reply.status_code != 200:
            return None
        try:
            return reply.json()
        except ValueError:
            return None

    async def probe(self, model: str) -> str | None:
        """Which way this server counts a prompt (asked once, whatever the answer)."""
        if self._probed:  # every quote after the first: no lock taken
            return self.kind
        async with self._lock:
            if not self._probed:
                self._probed = True
                for kind in (LLAMA, VLLM, LITELLM):
                    if await self._ask(kind, {"model": model, "messages": PROBE}) is not None:
                        self.kind = kind
                        break
        return self.kind

    async def count(self, body: JSON) -> int | None:
        """The prompt's tokens as the server counts them; None when it cannot say."""
        if await self.probe(str(body.get("model"))) is None:
            return None
        prompt = {k: body[k] for k in PROMPT_FIELDS if k in body}
        key = hashlib.sha256(codec.canonical(prompt)).hexdigest()
        found = self._counts.get(key)
        if found is None:
            assert self.kind is not None
            found = await self._ask(self.kind, prompt)
            if found is not None:
                self._counts[key] = found
        return found

    async def _ask(self, kind: str, prompt: JSON) -> int | None:
        if kind == LLAMA:
            applied = await self._post("apply-template", prompt)
            text = applied.get("prompt") if isinstance(applied, dict) else None
            if not isinstance(text, str):
                return None
            tokens = await self._post(
                "tokenize", {"content": text, "add_special": True, "parse_special": True}
            )
            found = tokens.get("tokens") if isinstance(tokens, dict) else None
            return len(found) if isinstance(found, list) else None
        if kind == VLLM:  # its chat form of /tokenize: the model's template applied
            asked: JSON = {k: prompt[k] for k in ("model", "messages", "tools") if k in prompt}
            counted = await self._post("tokenize", {**asked, "add_generation_prompt": True})
            value = counted.get("count") if isinstance(counted, dict) else None
        else:
            asked = {k: prompt[k] for k in ("model", "messages") if k in prompt}
            counted = await self._post("utils/token_counter", asked)
            value = counted.get("total_tokens") if isinstance(counted, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
