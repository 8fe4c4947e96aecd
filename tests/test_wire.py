"""runner.wire against a scripted HTTP server on loopback: framing, keep-alive, pool, failures."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from runner import http, wire

Script = Callable[[bytes, asyncio.StreamWriter], Any]


def reply(body: bytes, *, status: int = 200, extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


class ScriptedServer:
    """Reads each request whole, then lets the test's script answer it; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if await self.script(head + body, writer) == "close":
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def endpoint() -> AsyncIterator[Callable[[str], http.Endpoint]]:
    made: list[http.Endpoint] = []

    def make(url: str, **kwargs: Any) -> http.Endpoint:
        made.append(http.Endpoint(url, **kwargs))
        return made[-1]

    yield make
    for e in made:
        await e.aclose()


async def test_content_length_replies_reuse_one_connection(endpoint: Any) -> None:
    async def script(request: bytes, writer: asyncio.StreamWriter) -> None:
        _, _, body = request.partition(b"\r\n\r\n")
        writer.write(reply(json.dumps({"echo": json.loads(body)}).encode()))

    async with ScriptedServer(script) as server:
        api = endpoint(server.url, headers={"Authorization": "Bearer k"})
        for i in range(5):
            response = await api.read(api.request("POST", "/v1/run", {"n": i}))
            assert response.status_code == 200
            assert response.json() == {"echo": {"n": i}}
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /v1/run HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in first
        assert b"\r\nAuthorization: Bearer k\r\n" in first
        assert b'\r\n\r\n{"n":0}' in first


async def test_chunked_reply_with_extensions_and_trailers() -> None:
    async def script(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"5;ext=1\r\nhello\r\n")
        await writer.drain()
        writer.write(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")

    async with ScriptedServer(script) as server:
        api = http.Endpoint(server.url)
        try:
            for _ in range(2):
                response = await api.read(api.request("GET", "/x"))
                assert response.content == b"hello world"
            assert server.connections == 1
        finally:
            await api.aclose()


async def test_body_until_close_and_interim_reply() -> None:
    async def script(_: bytes, writer: asyncio.StreamWriter) -> str:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        writer.write(b"all of it")
        return "close"

    async with ScriptedServer(script) as server:
        api = http.Endpoint(server.url)
        try:
            assert (await api.read(api.request("GET", "/"))).content == b"all of it"
            assert (await api.read(api.request("GET", "/"))).content == b"all of it"
            assert server.connections == 2  # the first reply ended the connection
        finally:
            await api.aclose()


async def test_streamed_body_larger_than_the_read_buffer() -> None:
    size = 3 * wire.HIGH_WATER

    async def script(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(b"z" * size))

    async with ScriptedServer(script) as server:
        api = http.Endpoint(server.url)
        try:
            response = await api.send(api.request("GET", "/big"))
            received = 0
            async for part in response.aiter_raw():
                received += len(part)
                await asyncio.sleep(0)
            await response.aclose()
            assert received == size
            assert (await api.read(api.request("GET", "/big"))).content == b"z" * size
            assert server.connections == 1
        finally:
            await api.aclose()


async def test_reset_mid_body_is_a_failure_after_sending() -> None:
    async def script(_: bytes, writer: asyncio.StreamWriter) -> str:
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial":')
        return "close"

    async with ScriptedServer(script) as server:
        api = http.Endpoint(server.url)
        try:
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await api.read(api.request("POST", "/v1/run", {}))
            assert http.was_sent(caught.value)
        finally:
            await api.aclose()


async def test_stall_is_a_read_timeout_and_the_connection_is_not_reused() -> None:
    calls = 0

    async def script(_: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(1.0)
        writer.write(reply(b"{}"))

    async with ScriptedServer(script) as server:
        timeout = httpx.Timeout(connect=2.0, read=0.2, write=2.0, pool=None)
        api = http.Endpoint(server.url, timeout=timeout)
        try:
            with pytest.raises(httpx.ReadTimeout):
                await api.read(api.request("POST", "/v1/run", {}))
            assert (await api.read(api.request("POST", "/v1/run", {}))).json() == {}
            assert server.connections == 2
        finally:
            await api.aclose()


async def test_garbage_is_a_protocol_error() -> None:
    async def script(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    async with ScriptedServer(script) as server:
        api = http.Endpoint(server.url)
        try:
            with pytest.raises(httpx.RemoteProtocolError, match="status line"):
                await api.read(api.request("GET", "/"))
        finally:
            await api.aclose()


async def test_refused_connection_was_never_sent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        api = http.Endpoint(f"http://127.0.0.1:{port}")
        try:
            with pytest.raises(httpx.ConnectError) as caught:
                await api.read(api.request("GET", "/"))
            assert not http.was_sent(caught.value)
        finally:
            await api.aclose()


async def test_pool_never_opens_more_than_its_limit() -> None:
    in_flight = peak = 0

    async def script(_: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        writer.write(reply(b"{}"))

    async with ScriptedServer(script) as server:
        api = http.Endpoint(server.url, max_connections=4)
        try:
            await asyncio.gather(*(api.read(api.request("GET", "/")) for _ in range(40)))
            assert server.connections == 4
            assert peak == 4
        finally:
            await api.aclose()


async def test_cancelled_waiters_leave_the_pool_usable() -> None:
    async def script(_: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        writer.write(reply(b"{}"))

    async with ScriptedServer(script) as server:
        api = http.Endpoint(server.url, max_connections=2)
        try:
            tasks = [asyncio.ensure_future(api.read(api.request("GET", "/"))) for _ in range(10)]
            await asyncio.sleep(0.01)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            results = await asyncio.gather(*(api.read(api.request("GET", "/")) for _ in range(6)))
            assert all(r.status_code == 200 for r in results)
        finally:
            await api.aclose()


async def test_idle_connections_past_keepalive_are_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "KEEPALIVE_S", 0.05)

    async def script(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(b"{}"))

    async with ScriptedServer(script) as server:
        api = http.Endpoint(server.url, max_connections=1)
        try:
            await api.read(api.request("GET", "/"))
            await api.read(api.request("GET", "/"))
            assert server.connections == 1
            await asyncio.sleep(0.1)
            await api.read(api.request("GET", "/"))
            assert server.connections == 2  # and the pool's one slot was given back
        finally:
            await api.aclose()


async def test_connection_closed_by_the_server_while_idle_frees_its_slot() -> None:
    async def script(_: bytes, writer: asyncio.StreamWriter) -> str:
        writer.write(reply(b"{}", extra="Connection: close\r\n"))
        return "close"

    async with ScriptedServer(script) as server:
        api = http.Endpoint(server.url, max_connections=1)
        try:
            for _ in range(3):
                assert (await api.read(api.request("GET", "/"))).status_code == 200
            assert server.connections == 3
        finally:
            await api.aclose()
