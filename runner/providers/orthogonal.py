"""The Orthogonal Run API: `POST /v1/run` with `{api, path, body, dryRun}` → `{success, price, data}`."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from runner.core import catalog
from runner.core.config import ProviderSettings, Timeouts
from runner.core.errors import ConfigError, OutcomeUnknown, ProviderError, RequestFatalError
from runner.core.models import JSON, ChatRequest, Outcome, Quote
from runner.core.money import parse_usd
from runner.providers import http
from runner.providers.base import (
    HttpProvider,
    classify,
    error_message,
    http_url,
    outcome_from,
    table_quote,
    with_usage_option,
)
from runner.providers.connection import Connection, opened

DEFAULT_BASE_URL = "https://api.orth.sh"
DEFAULT_API = "baseten"
CHAT_PATH = "/v1/chat/completions"
RUN_PATH = "/v1/run"
MAX_TOKENS = catalog.DEFAULT_MAX_TOKENS  # the contract's default max_tokens


def build_run(body: JSON, *, api: str, path: str = CHAT_PATH, dry_run: bool = False) -> JSON:
    envelope: JSON = {"api": api, "path": path, "body": body}
    if dry_run:
        envelope["dryRun"] = True
    return envelope


def parse_envelope(payload: Any, *, status: int = 200) -> JSON:
    """The envelope of a 2xx reply; success:false raises the classified error."""
    if not isinstance(payload, dict):
        msg = f"unexpected Run API reply: {str(payload)[:200]}"
        raise classify(status, msg, code="UPSTREAM_ERROR")
    if payload.get("success") is False:
        message, code = error_message(payload)
        raise classify(status if status >= 400 else None, message or "request failed", code=code)
    return payload


def parse_price(payload: JSON) -> Any:
    """`price` as an exact Decimal (a string on the wire; other price fields disagree on units)."""
    price = payload.get("price")
    if price is None:
        return None
    try:
        return parse_usd(price if not isinstance(price, float) else repr(price))
    except ValueError:
        return None


class OrthogonalProvider(HttpProvider):
    name = "orthogonal"
    dry_runs = True  # quotes are calls: they count against the run's rate limits

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        api: str = DEFAULT_API,
        max_connections: int = 256,
        timeouts: Timeouts = Timeouts(),
    ) -> None:
        secret = http.Secret(api_key)
        endpoint = http.Endpoint(
            base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            max_connections=max_connections,
            timeouts=timeouts,
            secret=secret,
        )
        super().__init__(endpoint, secret)
        self.api = api

    async def quote(self, request: ChatRequest) -> Quote:
        try:
            envelope = build_run(request.body, api=self.api, dry_run=True)
            _, payload = await self._send_json("POST", RUN_PATH, envelope, billable=False)
            reply = parse_envelope(payload)
        except RequestFatalError as exc:
            # a refused dry run: fall back to the price table, marked as an estimate
            fallback = table_quote(request.body, catalog.get(request.model), default_max_tokens=MAX_TOKENS)
            return Quote(fallback.amount, exact=False, source="estimate", reason=str(exc))
        price = parse_price(reply)
        if price is None:
            fallback = table_quote(request.body, catalog.get(request.model), default_max_tokens=MAX_TOKENS)
            reason = "the dry run gave no price"
            return Quote(fallback.amount, exact=False, source="estimate", reason=reason)
        return Quote(amount=price, exact=True, source="dry_run")

    async def complete(self, request: ChatRequest, headers: dict[str, str] | None = None) -> Outcome:
        started = time.perf_counter()
        body = with_usage_option(request.body)
        if body.get("stream"):
            assembly, trailer, first = await self._send_stream(
                RUN_PATH, build_run(body, api=self.api), headers
            )
            if trailer.get("success") is False:
                raise parse_error(trailer)
            return outcome_from(
                assembly.completion(),
                parse_price(trailer),
                started,
                first,
                trailer.get("requestId"),
            )
        response, payload = await self._send_json(
            "POST", RUN_PATH, build_run(body, api=self.api), billable=True, headers=headers
        )
        envelope = parse_envelope(payload, status=response.status_code)
        data = envelope.get("data")
        if not isinstance(data, dict):
            msg = "the Run API reply has no completion data"
            raise OutcomeUnknown(msg)
        return outcome_from(data, parse_price(envelope), started, None, envelope.get("requestId"))

    async def models(self) -> list[str]:
        envelope = {"api": self.api, "path": "/v1/models", "method": "GET"}
        _, payload = await self._send_json("POST", RUN_PATH, envelope, billable=False)
        data = parse_envelope(payload).get("data") or {}
        return sorted(str(m["id"]) for m in data.get("data", []) if isinstance(m, dict))

    async def balance(self) -> Any:
        _, payload = await self._send_json("GET", "/v1/credits/balance", billable=False)
        return parse_usd(str(payload.get("balance")))

    async def transactions(self) -> list[JSON] | None:
        """The account's charges (each with the client request id it was sent with), or None when
        the provider lists none (a 404: it reports a balance only)."""
        try:
            _, payload = await self._send_json("GET", "/v1/credits/transactions", billable=False)
        except ProviderError as exc:
            if exc.status == 404:
                return None
            raise
        found = payload.get("transactions") if isinstance(payload, dict) else None
        return [t for t in found if isinstance(t, dict)] if isinstance(found, list) else []


def parse_error(payload: JSON) -> ProviderError:
    message, code = error_message(payload)
    return classify(None, message or "request failed", code=code)


@asynccontextmanager
async def connect(settings: ProviderSettings) -> AsyncIterator[Connection]:
    key = settings.api_key or os.environ.get("ORTHOGONAL_API_KEY")
    if not key:
        msg = "set ORTHOGONAL_API_KEY (or use --provider simulator to try runner offline)"
        raise ConfigError(msg)
    base = http_url(settings.base_url or os.environ.get("ORTHOGONAL_BASE_URL") or DEFAULT_BASE_URL)
    provider = OrthogonalProvider(
        api_key=key,
        base_url=base,
        api=settings.api or DEFAULT_API,
        max_connections=settings.max_connections,
        timeouts=settings.timeouts,
    )
    async with opened(provider, f"orthogonal:{base}:{settings.api or DEFAULT_API}") as conn:
        yield conn
