"""HTTP clients against one loopback server that answers after a delay, all in the same run: the
measurement behind the choice made in runner/http.py.

    uv run python benchmarks/transport.py [--requests 20000] [--concurrency 2000] [--latency 2]
                                          [--httpx-default]

The server is a separate process (aiohttp, a fixed ~400-byte Run API reply after --latency seconds),
so it does not share the clients' event loop. Compared, each with its rate and CPU seconds: a bare
aiohttp loop (the baseline), runner.providers.http.Endpoint (aiohttp behind runner's seam), httpx over
httpx-aiohttp's transport, and with --httpx-default httpx's default transport (slow at thousands of
connections: minutes at the defaults).
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

from runner.providers import http

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


def serve(port: int, latency: float) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if latency:
            await asyncio.sleep(latency)
        return web.Response(body=REPLY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/run", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def drive(send: object, total: int, concurrency: int) -> tuple[float, float]:
    """(requests per second, CPU seconds of this process)."""
    queue = iter(range(total))

    async def worker() -> None:
        for _ in queue:
            await send()  # type: ignore[operator]

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start), time.process_time() - cpu


async def bench_httpx(
    url: str, total: int, concurrency: int, transport: httpx.AsyncBaseTransport | None
) -> tuple[float, float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, transport=transport) as client:

        async def send() -> None:
            (await client.post("/v1/run", json=BODY)).json()

        return await drive(send, total, concurrency)


async def bench_aiohttp(url: str, total: int, concurrency: int) -> tuple[float, float]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:

        async def send() -> None:
            async with session.post("/v1/run", json=BODY) as response:
                await response.json()

        return await drive(send, total, concurrency)


async def bench_endpoint(url: str, total: int, concurrency: int) -> tuple[float, float]:
    """Endpoint.call: what the providers use."""
    endpoint = http.Endpoint(url, max_connections=concurrency)

    async def send() -> None:
        (await endpoint.call("POST", "/v1/run", BODY)).json()

    try:
        return await drive(send, total, concurrency)
    finally:
        await endpoint.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--httpx-default", action="store_true", help="also httpx's default transport")
    args = parser.parse_args()
    n, c = args.requests, args.concurrency
    port = free_port()
    server = multiprocessing.Process(target=serve, args=(port, args.latency), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.post(f"{url}/v1/run", json=BODY, timeout=args.latency + 10)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    results: dict[str, tuple[float, float]] = {}
    try:
        results["bare aiohttp loop (baseline)"] = asyncio.run(bench_aiohttp(url, n, c))
        results["runner.providers.http.Endpoint (aiohttp)"] = asyncio.run(bench_endpoint(url, n, c))
        limits = httpx.Limits(max_connections=c)
        results["httpx over httpx-aiohttp"] = asyncio.run(
            bench_httpx(url, n, c, AiohttpTransport(limits=limits))
        )
        if args.httpx_default:
            results["httpx default transport"] = asyncio.run(bench_httpx(url, n, c, None))
    finally:
        server.terminate()
    print(f"{n:,} requests, concurrency {c:,}, server latency {args.latency:g} s (loopback, own process)")
    base_rate, base_cpu = results["bare aiohttp loop (baseline)"]
    for name, (rate, cpu) in results.items():
        ratios = f"{rate / base_rate:.2f} x   {cpu:6.1f} s CPU  {cpu / base_cpu:.2f} x"
        print(f"{name:32} {rate:8,.0f} req/s  {ratios}")


if __name__ == "__main__":
    main()
