"""The Provider protocol and the one error classification used everywhere.

Building requests and parsing responses is pure (no I/O); `HttpProvider` is the only part that sends.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Protocol

from runner.core import codec, schema
from runner.core.errors import (
    ConfigError,
    OutcomeUnknown,
    ProviderError,
    RequestFatalError,
    RetryableError,
    RunFatalError,
    printable,
)
from runner.core.models import JSON, ChatRequest, Outcome, Quote, Usage
from runner.providers import http

RETRYABLE_STATUS = frozenset({408, 409, 429})
RUN_FATAL_STATUS = frozenset({401, 402})
RUN_FATAL_CODES = frozenset({"UNAUTHORIZED", "INSUFFICIENT_CREDITS", "SPEND_LIMIT_EXCEEDED"})
RETRYABLE_CODES = frozenset({"RATE_LIMITED", "UPSTREAM_ERROR"})
REQUEST_FATAL_CODES = frozenset({"NOT_FOUND", "BAD_REQUEST", "VALIDATION_ERROR"})
_TAGS = re.compile(r"<[^>]+>")


class Provider(Protocol):
    name: str
    dry_runs: bool  # whether a quote is a call to the provider (paced like calls) or a table lookup

    async def quote(self, request: ChatRequest) -> Quote: ...

    async def complete(self, request: ChatRequest, headers: dict[str, str] | None = None) -> Outcome: ...

    async def models(self) -> list[str]: ...

    async def aclose(self) -> None: ...


def classify(
    status: int | None,
    message: str,
    *,
    code: str | None = None,
    retry_after: float | None = None,
    should_retry: bool | None = None,
) -> ProviderError:
    """The error class for an HTTP status and/or a Run API error code."""
    kwargs: dict[str, Any] = {"status": status, "code": code, "retry_after": retry_after}
    if status in RUN_FATAL_STATUS or code in RUN_FATAL_CODES:
        return RunFatalError(message, **kwargs)
    if should_retry is not None:
        return (RetryableError if should_retry else RequestFatalError)(message, **kwargs)
    if status is not None and status >= 400:  # the status decides; a code only refines 2xx envelopes
        retryable = status in RETRYABLE_STATUS or status >= 500
        return (RetryableError if retryable else RequestFatalError)(message, **kwargs)
    if code in RETRYABLE_CODES:
        return RetryableError(message, **kwargs)
    return RequestFatalError(message, **kwargs)


def _error_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("message", "error", "detail"):
            if key in value:
                return _error_text(value[key])
        return json.dumps(value)[:300]
    return None


def error_message(payload: Any) -> tuple[str | None, str | None]:
    """(message, code) from any error shape: Run API envelope, upstream data.error, OpenAI nested,
    vLLM flat `{"object": "error", "message"}` or `{"error": "text"}`."""
    if not isinstance(payload, dict):
        return None, None
    code = payload.get("code")
    data = payload.get("data")
    upstream = data.get("error") if isinstance(data, dict) else None
    message = _error_text(upstream) or _error_text(payload.get("error"))
    if message is None and payload.get("object") == "error":
        message = _error_text(payload.get("message"))
    error = payload.get("error")
    if code is None and isinstance(error, dict) and isinstance(error.get("code"), str):
        code = error["code"]
    return message, code if isinstance(code, str) else None


def error_from_response(response: http.Reply, secret: http.Secret | None = None) -> ProviderError:
    """Classify a non-2xx (or success:false) response; the message never carries the key."""
    text = response.text
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    message, code = error_message(payload)
    if message is None:
        snippet = " ".join(_TAGS.sub(" ", text).split())[:200]
        message = f"non-JSON reply: {snippet}" if snippet else "empty reply"
    full = f"HTTP {response.status_code}: {message}"
    if secret is not None:
        full = secret.redact(full)
    return classify(
        response.status_code,
        full,
        code=code,
        retry_after=http.retry_after(response.headers),
        should_retry=http.should_retry(response.headers),
    )


def transport_error(exc: http.NetworkError, *, billable: bool) -> ProviderError:
    """A network failure: fatal for the run when no retry can help (TLS, unknown host, nobody
    listening); retried if it never reached the server or nothing is billed; else unknown."""
    if exc.fatal:
        return RunFatalError(str(exc), kind=exc.kind)
    if billable and exc.sent:
        return OutcomeUnknown(f"outcome unknown after the request was sent ({exc})", kind=exc.kind)
    return RetryableError(str(exc), kind=exc.kind)


class StreamAssembly:
    """Folds chat.completion.chunk deltas into one chat.completion (pure, no I/O)."""

    def __init__(self) -> None:
        self.meta: JSON = {}
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, JSON] = {}
        self.finish_reason: str | None = None
        self.usage: JSON | None = None
        self.extra: JSON = {}

    def add(self, chunk: JSON) -> None:
        if not self.meta and "id" in chunk:
            self.meta = {k: chunk.get(k) for k in ("id", "created", "model")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                self.reasoning.append(reasoning)
            for call in delta.get("tool_calls") or []:
                self._add_tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _add_tool_call(self, call: JSON) -> None:
        slot = self.tool_calls.setdefault(
            int(call.get("index", 0)),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            slot["id"] = call["id"]
        function = call.get("function") or {}
        if function.get("name"):
            slot["function"]["name"] += function["name"]
        if function.get("arguments"):
            slot["function"]["arguments"] += function["arguments"]

    def completion(self) -> JSON:
        message: JSON = {"role": "assistant", "content": "".join(self.content) or None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return {
            **self.meta,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
            "usage": self.usage,
        }


def with_usage_option(body: JSON) -> JSON:
    """A streamed body asks for the usage chunk, so that the price can be known."""
    if not body.get("stream"):
        return body
    options = dict(body.get("stream_options") or {})
    options["include_usage"] = True
    return {**body, "stream_options": options}


class HttpProvider:
    """Sending and receiving for the concrete providers: the one place they do I/O."""

    name = "http"
    dry_runs = False

    def __init__(self, endpoint: http.Endpoint, secret: http.Secret) -> None:
        self._endpoint = endpoint
        self._secret = secret
        self.paused_until = 0.0  # time.monotonic() before which the server asked for nothing more

    def _note_limits(self, headers: Any) -> None:
        """The server's x-ratelimit-* word on a reply: nothing left means wait for the reset."""
        if "x-ratelimit-remaining-requests" in headers or "x-ratelimit-remaining-tokens" in headers:
            wait = http.RateLimits.from_headers(headers).pause_s()
            if wait:
                self.paused_until = max(self.paused_until, time.monotonic() + wait)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._endpoint.base_url!r})"

    async def aclose(self) -> None:
        await self._endpoint.aclose()

    async def _send_json(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        billable: bool,
        headers: dict[str, str] | None = None,
    ) -> tuple[http.Reply, Any]:
        try:
            response = await self._endpoint.call(method, path, body, headers)
        except http.NetworkError as exc:
            raise transport_error(exc, billable=billable) from None
        if response.status_code >= 400:
            raise error_from_response(response, self._secret)
        self._note_limits(response.headers)
        try:
            return response, response.json()
        except ValueError:
            error = error_from_response(response, self._secret)
            if billable:  # a 200 we cannot read may still have been charged
                raise OutcomeUnknown(str(error), status=response.status_code) from None
            raise RetryableError(str(error), status=response.status_code) from None

    async def _send_stream(
        self, path: str, body: JSON, headers: dict[str, str] | None = None
    ) -> tuple[StreamAssembly, JSON, float | None]:
        """(assembled chunks, any non-chunk events, time to first token) of an SSE reply."""
        started = time.perf_counter()
        first_token: float | None = None
        assembly = StreamAssembly()
        trailer: JSON = {}
        try:
            async with self._endpoint.stream("POST", path, body, headers) as response:
                if response.status_code >= 400:
                    raise error_from_response(await response.read(), self._secret)
                self._note_limits(response.headers)
                async for data in http.sse_data(response.lines()):
                    if data == "[DONE]":
                        break
                    event = codec.loads(data)
                    if event.get("object") == "chat.completion.chunk":
                        if first_token is None and event.get("choices"):
                            first_token = time.perf_counter() - started
                        assembly.add(event)
                    else:
                        trailer.update(event)
        except http.NetworkError as exc:
            raise transport_error(exc, billable=True) from None
        except ValueError as exc:
            msg = f"unreadable stream event ({exc})"
            raise OutcomeUnknown(msg) from None
        return assembly, trailer, first_token


def outcome_from(
    completion: JSON, price: Any, started: float, first_token: float | None, request_id: Any
) -> Outcome:
    return Outcome(
        completion=completion,
        usage=Usage.from_openai(completion.get("usage")),
        price=price,
        latency_s=time.perf_counter() - started,
        first_token_s=first_token,
        request_id=None if request_id is None else str(request_id),
    )


def table_quote(body: JSON, info: Any, *, default_max_tokens: int | None = None) -> Quote:
    """A true upper bound from a price table: a bound on the prompt's tokens × the input price, plus
    the most tokens the answer can have × the output price (`schema.prompt_token_bound`)."""
    if info is None or not info.priced:
        reason = "model not in the price table" if info is None else "no published price"
        return Quote(amount=None, exact=False, source="price_table", reason=reason)
    amount = (
        schema.prompt_token_bound(body, info) * info.input_price
        + schema.output_token_bound(body, info, default=default_max_tokens) * info.output_price
    )
    return Quote(amount=amount, exact=False, source="price_table")


def usage_price(usage: Usage, info: Any) -> Any:
    """What the usage costs by a price table (None when the model has no price)."""
    if info is None or not info.priced:
        return None
    return usage.prompt_tokens * info.input_price + usage.completion_tokens * info.output_price


def http_url(url: str) -> str:
    """A base URL that can be called: http(s), with a host, and no credentials in it (a key goes in
    its environment variable, where it is sent as a header and never shown)."""
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        shown = f"{scheme}://****@{rest[authority.rindex('@') + 1 :]}"  # the credentials never shown
        msg = (
            f"the base URL carries credentials ({printable(shown)}): give the key in OPENAI_API_KEY "
            "or ORTHOGONAL_API_KEY instead, and the URL without them"
        )
        raise ConfigError(msg)
    if scheme.lower() not in ("http", "https") or not rest.strip("/"):
        msg = f"the base URL must look like https://host[:port][/path] (got '{printable(url)}')"
        raise ConfigError(msg)
    return url
