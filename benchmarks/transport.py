"""HTTP transport throughput against one zero-latency loopback server, all in the same run.

    uv run python benchmarks/transport.py [--requests 5000] [--concurrency 64]

The server is a separate process (aiohttp, a fixed ~400-byte Run API reply), so it does not share the
client's event loop. Compared: httpx's default transport, httpx over httpx-aiohttp's transport,
runner.http.Endpoint (httpx requests over runner.wire, asyncio protocols), and a bare aiohttp loop
as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import time

import aiohttp
import httpx
from aiohttp import web
from httpx_aiohttp import AiohttpTransport

from runner import http

REPLY = json.dumps(
    {
        "success": True,
        "price": "0.000012345",
        "requestId": "req_bench",
        "data": {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x" * 120}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        },
    }
).encode()
BODY = {"api": "baseten", "path": "/v1/chat/completions", "body": {"model": "m", "messages": []}}


def serve(port: int) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=REPLY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/run", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=2048)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def drive(send: object, total: int, concurrency: int) -> float:
    queue = iter(range(total))

    async def worker() -> None:
        for _ in queue:
            await send()  # type: ignore[operator]

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start)


async def bench_httpx(
    url: str, total: int, concurrency: int, transport: httpx.AsyncBaseTransport | None
) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, transport=transport) as client:

        async def send() -> None:
            (await client.post("/v1/run", json=BODY)).json()

        await drive(send, 200, concurrency)  # warm-up
        return await drive(send, total, concurrency)


async def bench_aiohttp(url: str, total: int, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:

        async def send() -> None:
            async with session.post("/v1/run", json=BODY) as response:
                await response.json()

        await drive(send, 200, concurrency)
        return await drive(send, total, concurrency)


async def bench_endpoint(url: str, total: int, concurrency: int, *, call: bool) -> float:
    """Endpoint.call (what providers use) or Endpoint.read of an httpx.Request, over runner.wire."""
    endpoint = http.Endpoint(url, max_connections=concurrency)

    async def send() -> None:
        if call:
            (await endpoint.call("POST", "/v1/run", BODY)).json()
        else:
            (await endpoint.read(endpoint.request("POST", "/v1/run", BODY))).json()

    try:
        await drive(send, 200, concurrency)
        return await drive(send, total, concurrency)
    finally:
        await endpoint.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    server = multiprocessing.Process(target=serve, args=(port,), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.post(f"{url}/v1/run", json=BODY)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        baseline = asyncio.run(bench_aiohttp(url, args.requests, args.concurrency))
        default = asyncio.run(bench_httpx(url, args.requests, args.concurrency, None))
        limits = httpx.Limits(max_connections=args.concurrency)
        over_aiohttp = asyncio.run(
            bench_httpx(url, args.requests, args.concurrency, AiohttpTransport(limits=limits))
        )
        requests = asyncio.run(bench_endpoint(url, args.requests, args.concurrency, call=False))
        ours = asyncio.run(bench_endpoint(url, args.requests, args.concurrency, call=True))
    finally:
        server.terminate()
    print(f"{args.requests} requests, concurrency {args.concurrency}, loopback, one aiohttp server process")
    print(f"bare aiohttp loop (baseline):   {baseline:8,.0f} req/s  1.00 x")
    print(f"httpx default transport:        {default:8,.0f} req/s  {default / baseline:.2f} x")
    print(f"httpx over httpx-aiohttp:       {over_aiohttp:8,.0f} req/s  {over_aiohttp / baseline:.2f} x")
    print(f"runner.wire, httpx.Request:     {requests:8,.0f} req/s  {requests / baseline:.2f} x")
    print(f"runner.wire, Endpoint.call:     {ours:8,.0f} req/s  {ours / baseline:.2f} x")


if __name__ == "__main__":
    main()
