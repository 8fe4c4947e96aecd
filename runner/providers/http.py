"""The one place an HTTP client is made: aiohttp's client, behind `Endpoint`.

Why aiohttp directly: the workload is thousands of calls in flight, each taking seconds, on a machine
whose CPU the ledger and the event loop share. `benchmarks/transport.py` (20,000 calls, a loopback
server answering after 2 s, concurrency 2,000, this 2-core machine): a bare aiohttp loop 949 req/s
with 3.2 s of CPU; this Endpoint 943 req/s (0.99 x) with 3.2 s; httpx's AsyncClient over the
httpx-aiohttp transport 879 req/s (0.93 x) with 8.6 s (2.7 x the CPU: the httpx layer costs more than
aiohttp's own work per call). httpx's default transport does not scale to thousands of connections
(31 req/s at 2,000 in flight). `benchmarks/latency.py` measures the whole run phase.

What a user of an HTTP client expects holds here as in httpx and the OpenAI SDK:
- proxies from HTTP_PROXY / HTTPS_PROXY / NO_PROXY, read as aiohttp's `trust_env` reads them, but
  once per endpoint (with `trust_env` aiohttp reads the environment and ~/.netrc again for every
  request, in a thread: a quarter of the run phase's CPU at 2,000 calls in flight);
- certificate authorities from SSL_CERT_FILE / SSL_CERT_DIR, else the system's;
- gzip/deflate replies decoded; 307/308 followed keeping method and body;
- a connect timeout of its own and a long read timeout (a non-streamed reasoning call is quiet for
  minutes), counted between bytes;
- a pool as large as the concurrency asked for, so no request waits for a connection.

Failures come out as `NetworkError`, which says whether the request can have reached the server
(judged from aiohttp's own exception types) and whether retrying can help at all (a certificate the
client refuses, a host that does not resolve, or a refused connection before any reply).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from runner.core import codec
from runner.core.config import RetryPolicy, Timeouts, parse_duration_s

USER_AGENT = "runner"
# idle connections kept under the 5 s idle timeout of uvicorn (vLLM) and llama.cpp's server, so that
# a connection taken from the pool is rarely one the server is closing
KEEPALIVE_S = 4.0


@dataclass(frozen=True, slots=True)
class Secret:
    """An API key that never shows itself in a repr, a log line or an exception."""

    value: str

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def redact(self, text: str) -> str:
        return text.replace(self.value, "****") if self.value else text


class NetworkError(Exception):
    """A call that failed below HTTP.

    `sent`: the request may have reached the server (its outcome is unknown); `fatal`: retrying
    cannot help (a certificate refused, a host unknown, nobody listening before any reply);
    `kind`: a stable name (tls, dns, connect, proxy, connect_timeout, timeout, disconnected, protocol).
    """

    def __init__(self, msg: str, *, kind: str, sent: bool, fatal: bool = False) -> None:
        super().__init__(msg)
        self.kind = kind
        self.sent = sent
        self.fatal = fatal


class Reply:
    """A whole reply: status, headers and the (decoded) body."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return codec.loads(self.content)


class StreamReply:
    """A reply whose body is read as it comes: `lines()` yields it line by line."""

    def __init__(self, response: aiohttp.ClientResponse, endpoint: Endpoint) -> None:
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers
        self._response = response
        self._endpoint = endpoint

    async def read(self) -> Reply:
        with self._endpoint.failures(sent=True):
            content = await self._response.read()
        return Reply(self.status_code, self.headers, content)

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's lines without their line ends (a line may span many reads)."""
        pending = bytearray()  # a line still arriving: appended to, never copied whole per read
        with self._endpoint.failures(sent=True):
            async for data in self._response.content.iter_any():
                if b"\n" not in data:
                    pending += data
                    continue
                first, *middle, last = data.split(b"\n")
                pending += first
                yield bytes(pending).removesuffix(b"\r")
                for line in middle:
                    yield line.removesuffix(b"\r")
                pending = bytearray(last)
        if pending:
            yield bytes(pending).removesuffix(b"\r")


def ssl_context() -> ssl.SSLContext:
    """Certificates from SSL_CERT_FILE / SSL_CERT_DIR when set (as httpx and OpenSSL read them),
    else the system's store."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    return ssl.create_default_context()


class Endpoint:
    """One API base URL, with its own connection pool; made and used inside one event loop."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        timeouts: Timeouts = Timeouts(),
        max_connections: int = 256,
        secret: Secret | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.host = urlsplit(self.base_url).hostname or self.base_url
        self.max_connections = max_connections
        self.timeouts = timeouts
        self._headers = {"Accept": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
        self._secret = secret or Secret("")
        self._session: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        self._urls: dict[str, str] = {}
        self.replied = False  # any reply seen: a refused connection after one is worth a retry

    def _url(self, path: str) -> str:
        found = self._urls.get(path)
        if found is None:
            found = self._urls[path] = f"{self.base_url}/{path.lstrip('/')}"
        return found

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            try:
                context = ssl_context()
            except (OSError, ssl.SSLError) as exc:
                msg = f"cannot load the certificates named by SSL_CERT_FILE / SSL_CERT_DIR: {exc}"
                raise NetworkError(msg, kind="tls", sent=False, fatal=True) from None
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,
                ssl=context,
                keepalive_timeout=KEEPALIVE_S,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timeouts.connect_s, sock_read=self.timeouts.read_s
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            try:  # the endpoint's one origin decides (a redirect elsewhere keeps the choice)
                self._proxy, self._proxy_auth = get_env_proxy_for_url(URL(self.base_url))
            except LookupError:  # no proxy for its scheme, or NO_PROXY names the host
                self._proxy = self._proxy_auth = None
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        form: aiohttp.FormData | None = None,
    ) -> Reply:
        """Send a request (a JSON body, or a multipart `form`, when given) and read the whole reply."""
        async with self.stream(method, path, body, headers, form) as reply:
            return await reply.read()

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        body: Any = None,
        extra: dict[str, str] | None = None,
        form: aiohttp.FormData | None = None,
    ) -> AsyncIterator[StreamReply]:
        """The reply with its body still to read; the connection goes back to the pool after.
        `extra`: headers of this request alone (its client request id, its idempotency key)."""
        data: Any = form if body is None else codec.dumps(body)
        headers = None if body is None else {"Content-Type": "application/json"}
        if extra:
            headers = {**(headers or {}), **extra}
        with self.failures(sent=None):
            response = await self.session().request(
                method,
                self._url(path),
                data=data,
                headers=headers,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
            )
        self.replied = True
        try:
            yield StreamReply(response, self)
        finally:
            response.release()

    def failures(self, *, sent: bool | None) -> Any:
        return _Failures(self, sent)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Failures:
    """Turns aiohttp's exceptions into `NetworkError` (a context manager, cheap to enter)."""

    __slots__ = ("endpoint", "sent")

    def __init__(self, endpoint: Endpoint, sent: bool | None) -> None:
        self.endpoint = endpoint
        self.sent = sent  # None: judge from the exception whether the request went out

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None or not isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | OSError):
            return
        raise network_error(exc, self.endpoint, sent=self.sent) from None


def network_error(exc: BaseException, endpoint: Endpoint, *, sent: bool | None = None) -> NetworkError:
    """What an aiohttp failure means for a request: was it sent, can a retry help."""
    host = endpoint.host
    detail = endpoint._secret.redact(str(exc) or type(exc).__name__)
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        msg = (
            f"TLS failed with {host}: {detail}. If a proxy or a private certificate authority signs "
            "its certificate, point SSL_CERT_FILE (or SSL_CERT_DIR) at that authority's certificate"
        )
        return NetworkError(msg, kind="tls", sent=False, fatal=True)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        msg = f"cannot resolve the host {host}: {detail}; check the base URL and the network"
        return NetworkError(msg, kind="dns", sent=False, fatal=True)
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        msg = f"cannot reach the proxy for {host}: {detail}; check HTTP_PROXY / HTTPS_PROXY / NO_PROXY"
        return NetworkError(msg, kind="proxy", sent=False, fatal=not endpoint.replied)
    if isinstance(exc, aiohttp.ClientConnectorError):
        msg = f"cannot connect to {host}: {detail}; check the base URL and that the server is up"
        return NetworkError(msg, kind="connect", sent=False, fatal=not endpoint.replied)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        msg = f"timed out connecting to {host} ({endpoint.timeouts.connect_s:g} s)"
        return NetworkError(msg, kind="connect_timeout", sent=False)
    if _unwritten(exc):  # the server closed a pooled connection just before we wrote on it
        msg = f"{host} closed the connection before the request was written ({detail})"
        return NetworkError(msg, kind="disconnected", sent=False)
    went_out = True if sent is None else sent
    if isinstance(exc, asyncio.TimeoutError):
        msg = f"no reply from {host} for {endpoint.timeouts.read_s:g} s (--timeout)"
        return NetworkError(msg, kind="timeout", sent=went_out)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | ConnectionError):
        msg = f"{host} closed the connection before the reply was complete ({detail})"
        return NetworkError(msg, kind="disconnected", sent=went_out)
    if isinstance(exc, aiohttp.InvalidURL):
        msg = f"not a URL that can be called: {detail}"
        return NetworkError(msg, kind="protocol", sent=False, fatal=True)
    msg = f"{type(exc).__name__} from {host}: {detail}"
    return NetworkError(msg, kind="protocol", sent=went_out)


def _unwritten(exc: BaseException) -> bool:
    """A request that never reached the server whole: aiohttp could not write it (a connection taken
    from the pool that the server was closing, as llama.cpp's server does after a streamed reply). A
    server acts on no request whose body it did not receive."""
    text = str(exc)
    return isinstance(exc, aiohttp.ClientOSError | ConnectionResetError) and (
        "Can not write request body" in text or "Cannot write to closing transport" in text
    )


async def sse_data(lines: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (fields other than data, and comments, are skipped)."""
    data: list[str] = []
    async for raw in lines:
        if not raw:
            if data:
                yield "\n".join(data)
                data = []
            continue
        line = raw.decode("utf-8", errors="replace")
        if line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
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


def should_retry(headers: Mapping[str, str]) -> bool | None:
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
    reset_tokens_s: float | None = None

    def pause_s(self) -> float:
        """How long to send nothing: until the reset, when the server says nothing is left."""
        waits = [
            reset if reset is not None else 1.0
            for remaining, reset in (
                (self.remaining_requests, self.reset_requests_s),
                (self.remaining_tokens, self.reset_tokens_s),
            )
            if remaining is not None and remaining <= 0
        ]
        return max(waits, default=0.0)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimits:
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
            reset_requests_s=duration_s(headers.get("x-ratelimit-reset-requests")),
            reset_tokens_s=duration_s(headers.get("x-ratelimit-reset-tokens")),
        )


duration_s = parse_duration_s  # Retry-After, x-ratelimit-reset-* values


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
