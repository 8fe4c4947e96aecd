"""The one place that makes HTTP clients and reads rate-limit and retry headers.

The code is written against httpx (`httpx.Request`, `httpx.Response`, httpx's exceptions); the bytes
move through `runner.wire.WireTransport`, an httpx transport of our own over asyncio protocols.
Chosen by benchmarks/transport.py (10,000 requests, concurrency 64, one aiohttp server process on
loopback, this 2-core machine, one run): bare aiohttp loop 7,210 req/s (baseline); httpx's default
transport 524 (0.07 x); httpx over httpx-aiohttp 2,365 (0.33 x); runner.wire with an httpx.Request
per call 8,813 (1.22 x); runner.wire through `Endpoint.call` 17,526 (2.43 x). This is the one place
the choice is made.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Any

import httpx

from runner import codec
from runner.wire import READ_WHOLE, WireTransport

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=None)
USER_AGENT = "runner"


@dataclass(frozen=True, slots=True)
class Secret:
    """An API key that never shows itself in a repr, a log line or an exception."""

    value: str

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def redact(self, text: str) -> str:
        return text.replace(self.value, "****") if self.value else text


class Reply:
    """A whole reply, as `Endpoint.call` returns it: status, headers (parsed when asked) and body."""

    __slots__ = ("_headers", "content", "raw_headers", "status_code")

    def __init__(self, status_code: int, raw_headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        self.status_code = status_code
        self.raw_headers = raw_headers
        self.content = content
        self._headers: httpx.Headers | None = None

    @property
    def headers(self) -> httpx.Headers:
        if self._headers is None:
            self._headers = httpx.Headers(self.raw_headers)
        return self._headers

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return codec.loads(self.content)


class Endpoint:
    """One API host. Requests are built here from cached parts and handed straight to the transport.

    httpx.AsyncClient.send adds per call what an API client does not use (cookie jar, redirects, auth
    flow, URL and header merging), and parsing the URL and headers of every request again costs as
    much as the rest of the httpx layer; here each path's URL and the headers are parsed once.
    httpx.Request and httpx.Response stay the types the rest of the code speaks; any httpx transport
    fits, so unit tests pass an httpx.MockTransport.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.transport = transport or WireTransport(max_connections=max_connections)
        base = {"Accept": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
        self._headers = httpx.Headers(base)
        self._json_headers = httpx.Headers({**base, "Content-Type": "application/json"})
        self._timeout = timeout.as_dict()
        self._urls: dict[str, httpx.URL] = {}
        self._heads: dict[tuple[str, str, bool], bytes] = {}  # request line and headers, less the length

    def _url(self, path: str) -> httpx.URL:
        found = self._urls.get(path)
        if found is None:
            found = self._urls[path] = httpx.URL(f"{self.base_url}/{path.lstrip('/')}")
        return found

    def request(self, method: str, path: str, body: Any = None) -> httpx.Request:
        url = self._url(path)
        extensions = {"timeout": self._timeout}
        if body is None:
            return httpx.Request(method, url, headers=self._headers, extensions=extensions)
        content = _json_bytes(body)
        return httpx.Request(method, url, headers=self._json_headers, content=content, extensions=extensions)

    async def call(self, method: str, path: str, body: Any = None) -> Reply:
        """Send a JSON request and read the whole reply.

        Over runner's own transport the request line and headers of each method and path are encoded
        once, and the call skips building an httpx.Request and httpx.Response, which together cost
        more than the rest of the exchange; any other transport gets an ordinary httpx.Request.
        """
        if not isinstance(self.transport, WireTransport):
            response = await self.read(self.request(method, path, body))
            return Reply(response.status_code, response.headers.raw, response.content)
        content = b"" if body is None else _json_bytes(body)
        key = (method, path, body is not None)
        prefix = self._heads.get(key)
        if prefix is None:
            headers = (self._headers if body is None else self._json_headers).raw
            prefix = self._heads[key] = self.transport.head(method, self._url(path), headers)
        head = prefix + b"Content-Length: %d\r\n\r\n" % len(content)
        status, headers, data = await self.transport.exchange(self._url(path), head, content, self._timeout)
        return Reply(status, headers, data)

    async def send(self, request: httpx.Request) -> httpx.Response:
        """The response with its body unread: iterate it and `aclose()` it."""
        response = await self.transport.handle_async_request(request)
        response.request = request
        return response

    async def read(self, request: httpx.Request) -> httpx.Response:
        """The response with its body read; on a failure mid-body the connection is closed."""
        request.extensions[READ_WHOLE] = True
        response = await self.send(request)
        try:
            await response.aread()
        except BaseException:
            await response.aclose()
            raise
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


def _json_bytes(body: Any) -> bytes:
    return codec.dumps(body)


def was_sent(exc: httpx.TransportError) -> bool:
    """Whether the request may have reached the server before the failure.

    Only a failure to connect (or to get a connection from the pool) proves the server never saw it.
    """
    return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def retry_after(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """Seconds to wait, from retry-after-ms or retry-after (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def should_retry(headers: httpx.Headers) -> bool | None:
    """The server's own word (x-should-retry), when it gives one."""
    value = headers.get("x-should-retry")
    if value is None:
        return None
    return str(value).strip().lower() == "true"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """What the server says of its limits (x-ratelimit-*), where it says it."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None

    @classmethod
    def from_headers(cls, headers: httpx.Headers) -> RateLimits:
        def number(name: str) -> int | None:
            try:
                return int(headers[name])
            except (KeyError, ValueError):
                return None

        return cls(
            limit_requests=number("x-ratelimit-limit-requests"),
            remaining_requests=number("x-ratelimit-remaining-requests"),
            limit_tokens=number("x-ratelimit-limit-tokens"),
            remaining_tokens=number("x-ratelimit-remaining-tokens"),
            reset_requests_s=_duration(headers.get("x-ratelimit-reset-requests")),
        )


def _duration(text: str | None) -> float | None:
    """'1s', '6m0s', '250ms' or a bare number of seconds."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            return None
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter and a cap; Retry-After wins when the server gives one."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 300.0


_TESTING = {"on": False}


def set_testing(on: bool) -> None:
    """Tests switch backoff off (waits of zero) without changing what is retried."""
    _TESTING["on"] = on


def backoff_s(policy: RetryPolicy, attempt: int, retry_after_s: float | None, rng: Any) -> float:
    if _TESTING["on"]:
        return 0.0
    if retry_after_s is not None:
        return min(retry_after_s, policy.max_retry_after_s)
    return float(rng.uniform(0, min(policy.cap_s, policy.base_s * 2 ** (attempt - 1))))
