"""HTTP/1.1 over asyncio protocols: the bytes under `runner.http.Endpoint`.

An API client needs a small part of HTTP: one request at a time on a kept-alive connection, a body of
known length, and a reply framed by Content-Length, chunked encoding or the end of the connection. This
module does just that, with a pool of connections per origin, TLS through the standard `ssl` module,
and failures reported as httpx's exceptions, which tell whether the server can have seen the request:

- ConnectError / ConnectTimeout: no connection was made, so nothing was sent;
- ReadTimeout / ReadError / RemoteProtocolError: the request was written (at least in part), so its
  outcome is unknown.

A pooled connection is reused only while it is open and has been idle for less than `KEEPALIVE_S`,
shorter than the idle timeouts servers use, so a request is rarely written into a connection that the
server is closing at the same moment.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx

KEEPALIVE_S = 15.0
READ_WHOLE = "runner.read_whole"  # request extension: the caller reads the whole body at once
MAX_HEAD = 64 * 1024  # bytes of status line and headers
HIGH_WATER = 256 * 1024  # unread body bytes before reading from the socket pauses
_CRLF = b"\r\n"


class _Reply:
    """The response being received on a connection: head, then body parts as they arrive."""

    __slots__ = ("body", "done", "error", "head", "stream", "waiter")

    def __init__(self, *, stream: bool) -> None:
        self.stream = stream  # read as it comes: reading pauses while too much lies unread
        self.head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.body: deque[bytes] = deque()
        self.done = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One kept-alive connection; parses the reply of the request in flight."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.reply: _Reply | None = None
        self.buffer = bytearray()
        self.state = "idle"  # idle · head · length · chunk-size · chunk-data · chunk-end · trailers · eof
        self.remaining = 0
        self.keep_alive = True
        self.closed = False
        self.last_used = time.monotonic()
        self.last_byte = 0.0
        self.unread = 0
        self.paused = False

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (not checked: some event loops' transports do not derive from asyncio.Transport)
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.last_byte = time.monotonic()
        if self.reply is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        reply = self.reply
        self.buffer += data
        try:
            self._parse(reply)
        except _ProtocolViolation as exc:
            self._fail(httpx.RemoteProtocolError(str(exc)))
            self.close()
        reply.wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        reply = self.reply
        if reply is None or reply.done:
            return
        if self.state == "eof":  # the body ran to the end of the connection
            self._finish(reply)
        else:
            reason = str(exc) if exc else "the server closed the connection before the reply was complete"
            self._fail(httpx.RemoteProtocolError(reason))
        reply.wake()

    # ---- request / response ---------------------------------------------------------------

    def start(self, head: bytes, body: bytes, *, stream: bool) -> _Reply:
        assert self.transport is not None
        self.reply = reply = _Reply(stream=stream)
        self.state, self.keep_alive, self.last_byte = "head", True, time.monotonic()
        self.buffer.clear()
        self.transport.write(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            self.transport.write(body)
        return reply

    def _parse(self, reply: _Reply) -> None:
        while self.buffer or self.state == "length":
            state = self.state
            if state == "idle":
                return
            if state == "head":
                if not self._parse_head(reply):
                    return
            elif state == "length":
                take = min(self.remaining, len(self.buffer))
                if take:
                    self._add_body(reply, bytes(self.buffer[:take]))
                    del self.buffer[:take]
                    self.remaining -= take
                if self.remaining == 0:
                    self._finish(reply)
                return
            elif state == "eof":
                self._add_body(reply, bytes(self.buffer))
                self.buffer.clear()
                return
            elif not self._parse_chunked(reply):
                return

    def _parse_head(self, reply: _Reply) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                raise _ProtocolViolation("the reply's headers are too long")
            return False
        lines = bytes(self.buffer[:end]).split(_CRLF)
        del self.buffer[: end + 4]
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            msg = f"not an HTTP/1.x status line: {lines[0][:80]!r}"
            raise _ProtocolViolation(msg)
        status = int(code)
        if 100 <= status < 200:  # an interim reply (100 Continue): the real one follows
            return True
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                msg = f"malformed header line: {line[:80]!r}"
                raise _ProtocolViolation(msg)
            name, value = name.strip(), value.strip()
            headers.append((name, value))
            lowered = name.lower()
            if lowered == b"content-length":
                if not value.isdigit():
                    msg = f"bad Content-Length: {value[:40]!r}"
                    raise _ProtocolViolation(msg)
                length = int(value)
            elif lowered == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif lowered == b"connection":
                token = value.lower()
                keep_alive = b"close" not in token and (keep_alive or b"keep-alive" in token)
        reply.head = (status, headers)
        self.keep_alive = keep_alive
        if chunked:
            self.state = "chunk-size"
        elif length is not None or status in (204, 304):
            self.state, self.remaining = "length", length or 0
        else:
            self.state, self.keep_alive = "eof", False
        return True

    def _parse_chunked(self, reply: _Reply) -> bool:
        if self.state == "chunk-data":
            take = min(self.remaining, len(self.buffer))
            self._add_body(reply, bytes(self.buffer[:take]))
            del self.buffer[:take]
            self.remaining -= take
            if self.remaining == 0:
                self.state = "chunk-end"
            return True
        end = self.buffer.find(_CRLF)
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                raise _ProtocolViolation("a chunk header is too long")
            return False
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        if self.state == "chunk-end":
            if line:
                raise _ProtocolViolation("a chunk is longer than its size says")
            self.state = "chunk-size"
        elif self.state == "chunk-size":
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                msg = f"bad chunk size: {line[:40]!r}"
                raise _ProtocolViolation(msg) from None
            self.state, self.remaining = ("chunk-data", size) if size else ("trailers", 0)
        elif not line:  # the empty line after the trailers ends the body
            self._finish(reply)
        return True

    def _add_body(self, reply: _Reply, part: bytes) -> None:
        if part:
            reply.body.append(part)
            self.unread += len(part)
            if reply.stream and self.unread > HIGH_WATER and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()

    def consumed(self, size: int) -> None:
        self.unread -= size
        if self.paused and self.unread <= HIGH_WATER // 4 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _finish(self, reply: _Reply) -> None:
        reply.done = True
        self.state = "idle"
        self.reply = None
        if self.buffer:  # more than one reply's worth: nothing else was asked
            self.keep_alive = False

    def _fail(self, error: BaseException) -> None:
        if self.reply is not None and not self.reply.done:
            self.reply.error = error
            self.reply.done = True
        self.keep_alive = False

    def timed_out(self, message: str) -> None:
        self._fail(httpx.ReadTimeout(message))
        self.close()

    def usable(self, now: float) -> bool:
        return (
            not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
            and (now - self.last_used < KEEPALIVE_S)
        )

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class _ProtocolViolation(Exception):
    pass


class _Pool:
    """Connections to one origin: idle ones reused newest first, at most `limit` open at a time."""

    def __init__(self, scheme: str, host: str, port: int, limit: int, ssl_context: ssl.SSLContext | None):
        self.scheme, self.host, self.port = scheme, host, port
        self.limit = limit
        self.ssl = ssl_context
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, connect_timeout: float | None) -> _Connection:
        reused = self._reuse()
        if reused is not None:
            return reused
        while self.open >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if not waiter.cancelled() and waiter.done():
                    self._wake_one()  # pass the slot we were given on to the next in line
                raise
            reused = self._reuse()
            if reused is not None:
                return reused
        self.open += 1
        try:
            return await self._connect(connect_timeout)
        except BaseException:
            self.open -= 1
            self._wake_one()
            raise

    def _reuse(self) -> _Connection | None:
        """The newest idle connection still fit for use; the stale ones are closed on the way."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
            self.open -= 1
        return None

    async def _connect(self, connect_s: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        try:
            async with asyncio.timeout(connect_s):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            msg = f"no connection to {self.host}:{self.port} within {connect_s:g} s"
            raise httpx.ConnectTimeout(msg) from None
        except (OSError, ssl.SSLError) as exc:
            msg = f"cannot connect to {self.host}:{self.port}: {exc}"
            raise httpx.ConnectError(msg) from None
        return conn

    def release(self, conn: _Connection) -> None:
        if conn.keep_alive and conn.reply is None and not conn.closed:
            conn.last_used = time.monotonic()
            self.idle.append(conn)
            self._wake_one()
        else:
            conn.close()
            self._drop()

    def forget(self, conn: _Connection) -> None:
        """The connection is gone; if it sat idle, its slot is free again."""
        if conn in self.idle:
            self.idle.remove(conn)
            self._drop()

    def _drop(self) -> None:
        self.open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class WireTransport(httpx.AsyncBaseTransport):
    """An httpx transport over `_Connection`s. With the READ_WHOLE extension the body is read before
    the response is returned; otherwise it streams and must be closed (`aclose()`)."""

    def __init__(self, *, max_connections: int = 256) -> None:
        self._limit = max_connections
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._ssl: ssl.SSLContext | None = None
        self._watchdog = _Watchdog()

    def _pool(self, url: httpx.URL) -> _Pool:
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        pool = self._pools.get(key)
        if pool is None:
            if url.scheme not in ("http", "https"):
                msg = f"unsupported URL scheme {url.scheme!r}"
                raise httpx.UnsupportedProtocol(msg)
            context = self._ssl_context() if url.scheme == "https" else None
            pool = self._pools[key] = _Pool(*key, limit=self._limit, ssl_context=context)
        return pool

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            import certifi  # noqa: PLC0415 - only for https, and httpx brings it

            self._ssl = ssl.create_default_context(cafile=certifi.where())
        return self._ssl

    @staticmethod
    def head(method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The request line and header lines (Host added when not given), each ending in CRLF; the
        caller adds Content-Length when it sends a body, and the empty line that ends the head."""
        lines = [b"%s %s HTTP/1.1\r\n" % (method.encode(), url.raw_path)]
        if not any(name.lower() == b"host" for name, _ in headers):
            lines.append(b"Host: " + url.netloc + b"\r\n")
        lines += [name + b": " + value + b"\r\n" for name, value in headers]
        return b"".join(lines)

    async def exchange(
        self, url: httpx.URL, head: bytes, body: bytes, timeouts: dict[str, Any]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send one request (`head`: its request line and headers, up to the empty line) and read the
        whole reply: (status, headers, body)."""
        pool = self._pool(url)
        conn = await pool.acquire(timeouts.get("connect"))
        reply = conn.start(head, body, stream=False)
        read_timeout = timeouts.get("read")
        try:
            await _until(self._watchdog, conn, reply, read_timeout, lambda: reply.done)
            if reply.error is not None:
                raise reply.error
        except BaseException:
            conn.close()
            pool.release(conn)
            raise
        assert reply.head is not None
        content = b"".join(reply.body)
        conn.consumed(len(content))
        pool.release(conn)
        return reply.head[0], reply.head[1], content

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        body = request.content
        head = self.head(request.method, request.url, request.headers.raw)
        if body and "content-length" not in request.headers:
            head += b"Content-Length: %d\r\n" % len(body)
        head += b"\r\n"
        if request.extensions.get(READ_WHOLE):
            status, headers, content = await self.exchange(request.url, head, body, timeouts)
            return httpx.Response(status, headers=headers, content=content, request=request)
        pool = self._pool(request.url)
        conn = await pool.acquire(timeouts.get("connect"))
        reply = conn.start(head, body, stream=True)
        read_timeout = timeouts.get("read")
        try:
            ready = lambda: reply.head is not None or reply.done  # noqa: E731
            await _until(self._watchdog, conn, reply, read_timeout, ready)
            if reply.head is None:
                raise reply.error or httpx.RemoteProtocolError("no reply")
        except BaseException:
            conn.close()
            pool.release(conn)
            raise
        status, headers = reply.head
        stream = _Body(self._watchdog, pool, conn, reply, read_timeout)
        return httpx.Response(status, headers=headers, stream=stream, request=request)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


class _Watchdog:
    """Read timeouts for every wait in flight, checked by one timer rather than one timer per wait.

    A wait times out once no byte has arrived for its timeout (counted from the later of the last
    byte and the start of the wait); the check runs every quarter of the shortest timeout waited on,
    at most every second, so a timeout fires within a quarter of itself (or a second) past its due.
    """

    def __init__(self) -> None:
        self.waits: dict[_Reply, tuple[_Connection, float, float]] = {}
        self.timer: asyncio.TimerHandle | None = None

    def watch(self, conn: _Connection, reply: _Reply, timeout: float) -> None:
        self.waits[reply] = (conn, timeout, time.monotonic())
        if self.timer is None:
            self._schedule(timeout)

    def unwatch(self, reply: _Reply) -> None:
        self.waits.pop(reply, None)

    def _schedule(self, shortest: float) -> None:
        self.timer = asyncio.get_running_loop().call_later(min(1.0, shortest / 4), self._check)

    def _check(self) -> None:
        self.timer = None
        now = time.monotonic()
        for reply, (conn, timeout, since) in list(self.waits.items()):
            if now - max(conn.last_byte, since) >= timeout:
                del self.waits[reply]
                conn.timed_out(f"no reply byte within {timeout:g} s")
                reply.wake()
        if self.waits:
            self._schedule(min(timeout for _, timeout, _ in self.waits.values()))


async def _until(
    watchdog: _Watchdog, conn: _Connection, reply: _Reply, read_timeout: float | None, ready: Any
) -> None:
    """Wait until `ready()`; a ReadTimeout when no byte arrives for `read_timeout` seconds."""
    if ready():
        return
    loop = asyncio.get_running_loop()
    if read_timeout is not None:
        watchdog.watch(conn, reply, read_timeout)
    try:
        while not ready():
            waiter = reply.waiter = loop.create_future()
            await waiter
    finally:
        watchdog.unwatch(reply)


class _Body(httpx.AsyncByteStream):
    def __init__(
        self, watchdog: _Watchdog, pool: _Pool, conn: _Connection, reply: _Reply, read_timeout: float | None
    ) -> None:
        self._watchdog, self._pool, self._conn, self._reply = watchdog, pool, conn, reply
        self._timeout = read_timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reply, conn = self._reply, self._conn
        try:
            while True:
                while reply.body:
                    part = reply.body.popleft()
                    conn.consumed(len(part))
                    yield part
                if reply.error is not None:
                    raise reply.error
                if reply.done:
                    break
                ready = lambda: bool(reply.body) or reply.done  # noqa: E731
                await _until(self._watchdog, conn, reply, self._timeout, ready)
        except BaseException:
            conn.close()
            raise
        finally:
            if reply.done and not reply.body:
                self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._conn)

    async def aclose(self) -> None:
        if not self._reply.done:  # closed before the end: the rest of the reply would block the next
            self._conn.close()
        self._release()


__all__ = ["KEEPALIVE_S", "READ_WHOLE", "WireTransport"]
