"""HTTP conventions users expect of any client (as httpx and the OpenAI SDK give them), on loopback:
proxies from the environment, certificate authorities from SSL_CERT_FILE, compressed replies,
307 redirects, failures that no retry can mend, the pool following --concurrency."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from typer.testing import CliRunner

from runner.cli.main import app
from runner.core.config import Timeouts
from runner.core.errors import OutcomeUnknown, RequestFatalError, RunFatalError
from runner.core.jobs import body_sha256
from runner.core.models import ChatRequest
from runner.providers import http
from runner.providers.openai import OpenAIProvider
from runner.simulator import Books, SimulatorThread

Serve = Callable[[web.Application], Awaitable[str]]
BODY: dict[str, Any] = {
    "model": "openai/gpt-oss-120b",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 16,
}
COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "openai/gpt-oss-120b",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


def chat(body: dict[str, Any] | None = None) -> ChatRequest:
    body = body or BODY
    return ChatRequest("job.jsonl", 1, "x", body, {}, body_sha256(body))


def forward_proxy(seen: list[str]) -> web.Application:
    """A plain HTTP forward proxy: notes each request's absolute target and forwards it."""

    async def forward(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.url}")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "proxy-connection")}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(request.method, request.url, data=await request.read(), headers=headers) as reply,
        ):
            body = await reply.read()
            kept = {
                k: v for k, v in reply.headers.items() if k.lower() in ("content-type", "content-encoding")
            }
            return web.Response(status=reply.status, body=body, headers=kept)

    proxy = web.Application()
    proxy.router.add_route("*", "/{tail:.*}", forward)
    return proxy


async def test_requests_go_through_http_proxy_unless_no_proxy_names_the_host(
    sim: SimulatorThread, serve_app: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    monkeypatch.setenv("HTTP_PROXY", await serve_app(forward_proxy(seen)))
    provider = OpenAIProvider(api_key="k", base_url=sim.base_url + "/v1")
    outcome = await provider.complete(chat())
    await provider.aclose()
    assert outcome.message["content"]
    assert seen == [f"POST {sim.base_url}/v1/chat/completions"]

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    provider = OpenAIProvider(api_key="k", base_url=sim.base_url + "/v1")
    await provider.complete(chat())
    await provider.aclose()
    assert len(seen) == 1  # straight to the host this time


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_sim(authority: trustme.CA) -> Iterator[SimulatorThread]:
    """The simulator over TLS, its certificate signed by an authority made for the test."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    with SimulatorThread(Books(), ssl_context=context) as server:
        yield server


async def test_a_private_authority_named_by_ssl_cert_file_is_trusted(
    tls_sim: SimulatorThread, authority: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    provider = OpenAIProvider(api_key="k", base_url=tls_sim.base_url + "/v1")
    outcome = await provider.complete(chat())
    await provider.aclose()
    assert outcome.message["content"]


async def test_a_private_authority_in_ssl_cert_dir_is_trusted(
    tls_sim: SimulatorThread, authority: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "certs"
    folder.mkdir()
    authority.cert_pem.write_to_path(str(folder / "ca.pem"))
    # OpenSSL finds a CA in a folder by the hash of its subject, as `openssl rehash` names it
    subject_hash = _subject_hash(folder / "ca.pem")
    (folder / f"{subject_hash}.0").symlink_to(folder / "ca.pem")
    monkeypatch.setenv("SSL_CERT_DIR", str(folder))
    provider = OpenAIProvider(api_key="k", base_url=tls_sim.base_url + "/v1")
    outcome = await provider.complete(chat())
    await provider.aclose()
    assert outcome.message["content"]


def _subject_hash(pem: Path) -> str:
    import subprocess  # noqa: PLC0415 - only this test asks openssl

    done = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(pem)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


async def test_an_untrusted_certificate_is_fatal_and_names_the_host_and_ssl_cert_file(
    tls_sim: SimulatorThread,
) -> None:
    provider = OpenAIProvider(api_key="k", base_url=tls_sim.base_url + "/v1")
    with pytest.raises(RunFatalError) as caught:
        await provider.complete(chat())
    await provider.aclose()
    assert caught.value.error_type == "tls"
    assert "127.0.0.1" in str(caught.value) and "SSL_CERT_FILE" in str(caught.value)
    assert tls_sim.books.stats()["counters"].get("openai.chat", 0) == 0


def test_a_run_against_an_untrusted_certificate_stops_at_once_with_the_reason(
    tls_sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    job = write_job([{**BODY, "custom_id": f"c{i}"} for i in range(20)])
    started = time.monotonic()
    args = ["--provider", "openai", "--base-url", tls_sim.base_url + "/v1", "--max-usd", "1"]
    result = CliRunner().invoke(app, ["run", str(job), *args])
    assert time.monotonic() - started < 5
    assert result.exit_code == 4, result.output
    assert "TLS failed with 127.0.0.1" in result.output and "SSL_CERT_FILE" in result.output
    assert "Traceback" not in result.output


async def test_gzip_replies_are_decoded_ok_or_not(serve_app: Serve) -> None:
    async def completions(request: web.Request) -> web.Response:
        assert "gzip" in request.headers.get("Accept-Encoding", "")
        body = await request.json()
        status, payload = (200, COMPLETION) if body["max_tokens"] < 100 else (400, {"error": "too many"})
        packed = gzip.compress(json.dumps(payload).encode())
        return web.Response(
            status=status,
            body=packed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    server = web.Application()
    server.router.add_post("/v1/chat/completions", completions)
    provider = OpenAIProvider(base_url=await serve_app(server) + "/v1")
    outcome = await provider.complete(chat())
    assert outcome.message["content"] == "hello" and outcome.usage.prompt_tokens == 5
    with pytest.raises(RequestFatalError, match="HTTP 400: too many"):
        await provider.complete(chat({**BODY, "max_tokens": 500}))
    await provider.aclose()


@pytest.mark.parametrize("status", [307, 308])
async def test_a_temporary_or_permanent_redirect_keeps_method_and_body(serve_app: Serve, status: int) -> None:
    received: list[tuple[str, Any]] = []

    async def moved(request: web.Request) -> web.Response:
        raise (
            web.HTTPTemporaryRedirect("/v2/chat/completions")
            if status == 307
            else (web.HTTPPermanentRedirect("/v2/chat/completions"))
        )

    async def completions(request: web.Request) -> web.Response:
        received.append((request.method, await request.json()))
        return web.json_response(COMPLETION)

    server = web.Application()
    server.router.add_post("/v1/chat/completions", moved)
    server.router.add_post("/v2/chat/completions", completions)
    provider = OpenAIProvider(base_url=await serve_app(server) + "/v1")
    outcome = await provider.complete(chat())
    await provider.aclose()
    assert outcome.message["content"] == "hello"
    assert received == [("POST", BODY)]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_nobody_listening_is_fatal_before_any_reply_and_retryable_after() -> None:
    endpoint = http.Endpoint(f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(http.NetworkError) as caught:
        await endpoint.call("GET", "/v1/models")
    assert caught.value.kind == "connect" and caught.value.fatal and not caught.value.sent
    assert "cannot connect to 127.0.0.1" in str(caught.value)
    endpoint.replied = True  # once the server has answered, a refused connection may be a restart
    with pytest.raises(http.NetworkError) as caught:
        await endpoint.call("GET", "/v1/models")
    assert not caught.value.fatal and not caught.value.sent
    await endpoint.aclose()


async def test_an_unknown_host_is_fatal_and_named() -> None:
    provider = OpenAIProvider(base_url="http://no-such-host.invalid/v1")
    with pytest.raises(RunFatalError, match=r"cannot resolve the host no-such-host\.invalid") as caught:
        await provider.complete(chat())
    await provider.aclose()
    assert caught.value.error_type == "dns"


async def test_a_silent_server_is_a_read_timeout_after_sending(serve_app: Serve) -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response(COMPLETION)

    server = web.Application()
    server.router.add_post("/v1/chat/completions", silent)
    provider = OpenAIProvider(base_url=await serve_app(server) + "/v1", timeouts=Timeouts(2.0, 0.3))
    started = time.monotonic()
    with pytest.raises(OutcomeUnknown, match=r"no reply .* for 0.3 s") as caught:
        await provider.complete(chat())
    assert time.monotonic() - started < 2
    assert caught.value.error_type == "timeout"
    await provider.aclose()


async def test_the_pool_holds_as_many_connections_as_the_concurrency(serve_app: Serve) -> None:
    """300 calls at once, each held by the server until all have arrived: a pool capped below 300
    would leave the server waiting for ever."""
    arrived = 0
    all_in = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        if arrived == 300:
            all_in.set()
        await all_in.wait()
        return web.json_response({"ok": True})

    server = web.Application()
    server.router.add_get("/held", held)
    endpoint = http.Endpoint(await serve_app(server), max_connections=300)
    async with asyncio.timeout(20):
        replies = await asyncio.gather(*(endpoint.call("GET", "/held") for _ in range(300)))
    await endpoint.aclose()
    assert [r.status_code for r in replies] == [200] * 300


def test_timeouts_are_options_of_run_and_estimate(write_job: Callable[..., Path]) -> None:
    job = write_job([BODY])
    for command in ("run", "estimate"):
        result = CliRunner().invoke(app, [command, str(job), "--provider", "simulator", "--timeout", "-1"])
        assert result.exit_code == 2, result.output
        assert "--timeout must be above 0 seconds" in result.output


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientOSError(None, "Can not write request body for http://127.0.0.1/v1/chat/completions"),
        aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
    ],
)
def test_a_request_that_could_not_be_written_was_not_sent(exc: Exception) -> None:
    """A pooled connection the server closed (llama.cpp's server does after each streamed reply): the
    request never reached it whole, so it is retried, not called possibly billed."""
    error = http.network_error(exc, http.Endpoint("http://127.0.0.1"))
    assert not error.sent and not error.fatal and error.kind == "disconnected"


def test_a_reply_cut_off_after_sending_is_an_unknown_outcome() -> None:
    error = http.network_error(aiohttp.ServerDisconnectedError(), http.Endpoint("http://127.0.0.1"))
    assert error.sent and not error.fatal


async def test_x_ratelimit_headers_pace_the_run_before_a_429_comes(
    serve_app: Serve, write_job: Callable[..., Path]
) -> None:
    """The server says on the 3rd reply that no request is left for 0.8 s: the 4th waits for the
    reset instead of meeting a 429."""
    import time as clock  # noqa: PLC0415
    from decimal import Decimal  # noqa: PLC0415

    from runner.app.run import run_job  # noqa: PLC0415
    from runner.core.config import RunConfig  # noqa: PLC0415
    from runner.ledger import Ledger  # noqa: PLC0415
    from runner.providers.registry import Connection  # noqa: PLC0415

    arrivals: list[float] = []

    async def completions(request: web.Request) -> web.Response:
        arrivals.append(clock.monotonic())
        left = "0" if len(arrivals) == 3 else "50"
        headers = {"x-ratelimit-remaining-requests": left, "x-ratelimit-reset-requests": "800ms"}
        return web.json_response(COMPLETION, headers=headers)

    server = web.Application()
    server.router.add_post("/v1/chat/completions", completions)
    provider = OpenAIProvider(base_url=await serve_app(server) + "/v1")
    job = write_job([{**BODY, "custom_id": f"c{i}"} for i in range(5)])
    try:
        result = await run_job(
            # five identical lines, each sent
            RunConfig(job=job, max_usd=Decimal(1), concurrency=1, cache="off"),
            conn=Connection(provider, "openai:test"),
            ledger=Ledger(),
        )
    finally:
        await provider.aclose()
    assert result.states == {"ok": 5}
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert gaps[2] >= 0.75  # after the 3rd reply: the reset awaited
    assert max(gaps[:2] + gaps[3:]) < 0.5


async def test_stream_lines_arrive_whole_however_the_bytes_are_cut(serve_app: Serve) -> None:
    body = b"data: " + b"x" * 70_000 + b"\r\n\r\ndata: short\n\ndata: last"

    async def stream(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await reply.prepare(request)
        for start in range(0, len(body), 997):  # cuts inside lines and inside line ends
            await reply.write(body[start : start + 997])
            await asyncio.sleep(0)
        await reply.write_eof()
        return reply

    server = web.Application()
    server.router.add_post("/s", stream)
    endpoint = http.Endpoint(await serve_app(server))
    async with endpoint.stream("POST", "/s", {}) as reply:
        events = [data async for data in http.sse_data(reply.lines())]
    await endpoint.aclose()
    assert events == ["x" * 70_000, "short", "last"]
