"""The simulator's HTTP server (aiohttp): the Run API and the OpenAI-compatible API on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from runner.core import catalog, schema
from runner.simulator import batches
from runner.simulator.books import Books
from runner.simulator.fakes import Fake, generate, prompt_tokens

BOOKS: web.AppKey[Books] = web.AppKey("books", Books)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(payload).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _run_error(status: int, code: str, message: str) -> web.Response:
    return _json({"success": False, "error": message, "code": code}, status)


def _openai_error(status: int, message: str, kind: str, code: str | None = None) -> web.Response:
    return _json({"error": {"message": message, "type": kind, "code": code}}, status)


def _authorized(books: Books, request: web.Request) -> bool:
    return books.authorized(request.headers.get("Authorization", ""))


def _completion(body: dict[str, Any], fake: Fake, request_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": fake.content}
    if fake.reasoning:
        message["reasoning_content"] = fake.reasoning
    if fake.tool_calls:
        message["tool_calls"] = fake.tool_calls
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": fake.finish_reason, "logprobs": None}],
        "usage": fake.usage(),
    }


def _chunks(body: dict[str, Any], fake: Fake, request_id: str) -> list[dict[str, Any]]:
    base = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body["model"],
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    words = (fake.reasoning or "").split(" ")
    out += [
        chunk({"reasoning_content": " ".join(words[i : i + 8]) + " "})
        for i in range(0, len(words), 8)
        if fake.reasoning
    ]
    for i, call in enumerate(fake.tool_calls):
        out.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
        )
        args = call["function"]["arguments"]
        out += [
            chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j : j + 16]}}]})
            for j in range(0, len(args), 16)
        ]
    text = fake.content or ""
    out += [chunk({"content": text[i : i + 24]}) for i in range(0, len(text), 24)]
    out.append(chunk({}, fake.finish_reason))
    if (body.get("stream_options") or {}).get("include_usage"):
        out.append({**base, "choices": [], "usage": fake.usage()})
    return out


async def _fault_reply(
    books: Books, fault: str, request: web.Request, *, run_api: bool
) -> web.StreamResponse:
    books.counters[f"fault.{fault}"] += 1
    if fault == "429":
        wait = books.retry_after_s
        headers = {"Retry-After": str(max(1, round(wait))), "retry-after-ms": str(int(wait * 1000))}
        if run_api:
            return _json(
                {"success": False, "error": "rate limited (simulated)", "code": "RATE_LIMITED"},
                429,
                headers,
            )
        return _json({"error": {"message": "rate limited (simulated)", "type": "rate_limit"}}, 429, headers)
    if fault in ("500", "502", "503"):
        status = int(fault)
        if run_api:
            payload = {
                "success": False,
                "error": "upstream error",
                "code": "UPSTREAM_ERROR",
                "data": {"error": {"type": "server_error", "message": f"simulated {status}"}},
            }
            return _json(payload, status)
        return _json({"object": "error", "message": f"simulated {status}", "code": status}, status)
    if fault == "502html":
        return web.Response(text=HTML_502, status=502, content_type="text/html")
    if fault == "envelope":
        return _json({"success": False, "error": "simulated upstream failure", "code": "UPSTREAM_ERROR"})
    if fault == "402":
        return _run_error(402, "INSUFFICIENT_CREDITS", "insufficient credits (simulated)")
    if fault == "401":
        return _run_error(401, "UNAUTHORIZED", "invalid API key (simulated)")
    msg = f"unknown fault {fault}"
    raise web.HTTPBadRequest(text=msg)


async def _reset_mid_body(request: web.Request, payload: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    if request.transport is not None:
        request.transport.abort()
    return response


def _invalid(problems: list[tuple[str, str]], *, run_api: bool) -> web.Response:
    """A body the contract refuses: 400, as the Run API or an OpenAI-compatible server says it."""
    message = "; ".join(f"{f}: {m}" for f, m in problems[:5])
    if not run_api:
        return _openai_error(400, message, "invalid_request_error")
    error = {"type": "invalid_request_error", "message": message}
    reply = {"success": False, "error": "upstream error", "code": "UPSTREAM_ERROR", "data": {"error": error}}
    return _json(reply, 400)


async def _answer_delay(books: Books, *, streamed: bool) -> float:
    """A call's latency, waited (half of it before a streamed reply's first byte); the latency."""
    delay = books.delay()
    if delay:
        books.in_flight += 1  # calls being answered at once: what a client's concurrency cap allows
        books.peak_in_flight = max(books.peak_in_flight, books.in_flight)
        try:
            await asyncio.sleep(delay / 2 if streamed else delay)
        finally:
            books.in_flight -= 1
    return delay


async def _serve_chat(
    request: web.Request, body: dict[str, Any], *, run_api: bool, dry_run: bool
) -> web.StreamResponse:
    books = request.app[BOOKS]
    problems = schema.check_body(body)
    if problems:
        return _invalid(problems, run_api=run_api)
    body_text = json.dumps(body, sort_keys=True)
    body_sha = hashlib.sha256(body_text.encode()).hexdigest()
    fault = books.pick_fault(body_text, dry_run=dry_run)
    if fault not in (None, "reset", "stall"):
        return await _fault_reply(books, fault, request, run_api=run_api)
    tokens = prompt_tokens(body)
    if dry_run:
        books.counters["run.dry_run"] += 1
        if wait := books.delay(dry_run=True):
            await asyncio.sleep(wait)
        return _json({"success": True, "price": f"{books.quote(body, tokens):f}", "dryRun": True})
    books.counters["run.call" if run_api else "openai.chat"] += 1
    key = request.headers.get("Idempotency-Key") if books.idempotent else None
    replay = books.replies.get(key) if key else None
    if replay is not None:  # the same request again: the reply it was charged for, at no charge
        books.counters["idempotent_replay"] += 1
        fake, price, request_id = replay
    else:
        fake = generate(body, catalog.get(body["model"]))
        price = books.charge_for(body["model"], fake.prompt_tokens, fake.completion_tokens)
    delay = await _answer_delay(books, streamed=bool(body.get("stream")))
    if replay is None:
        request_id = books.charge(
            price,
            model=body["model"],
            endpoint="run" if run_api else "openai",
            body_sha=body_sha,
            client_request_id=request.headers.get("X-Client-Request-Id"),
            idempotency_key=key,
        )
        if request_id is not None and key:
            books.replies[key] = (fake, price, request_id)
    if request_id is None:
        if run_api:
            return _run_error(402, "INSUFFICIENT_CREDITS", "insufficient credits")
        return _openai_error(402, "insufficient credits", "billing_error", "insufficient_quota")
    if fault == "stall":
        books.counters["fault.stall"] += 1
        await asyncio.sleep(books.stall_s)
    if body.get("stream"):
        return await _stream(request, body, fake, request_id, price if run_api else None, delay / 2)
    completion = _completion(body, fake, request_id)
    payload = (
        {"success": True, "price": f"{price:f}", "data": completion, "requestId": request_id}
        if run_api
        else completion
    )
    if fault == "reset":
        books.counters["fault.reset"] += 1
        return await _reset_mid_body(request, json.dumps(payload).encode())
    return _json(payload)


async def _stream(
    request: web.Request,
    body: dict[str, Any],
    fake: Fake,
    request_id: str,
    price: Any,
    spread: float,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    chunks = _chunks(body, fake, request_id)
    pause = spread / len(chunks) if spread else 0.0
    for chunk in chunks:
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if pause:
            await asyncio.sleep(pause)
    if price is not None:  # the Run API's charge, as a trailing event
        trailer = {"success": True, "price": f"{price:f}", "requestId": request_id}
        await response.write(f"data: {json.dumps(trailer)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _models_list() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": m.slug,
                "object": "model",
                "created": 0,
                "owned_by": m.slug.split("/")[0],
                "context_length": m.context_window,
            }
            for m in catalog.MODELS.values()
        ],
    }


async def run_api(request: web.Request) -> web.StreamResponse:
    books = request.app[BOOKS]
    if not _authorized(books, request):
        return _run_error(401, "UNAUTHORIZED", "missing or invalid API key")
    try:
        envelope = await request.json()
    except ValueError:
        return _run_error(400, "BAD_REQUEST", "the body is not JSON")
    path = envelope.get("path")
    if path == "/v1/models" and envelope.get("method", "GET") == "GET":
        books.counters["run.models"] += 1
        return _json({"success": True, "price": "0", "data": _models_list()})
    if path != "/v1/chat/completions" or not isinstance(envelope.get("body"), dict):
        return _run_error(404, "NOT_FOUND", f"no such endpoint: {path}")
    return await _serve_chat(request, envelope["body"], run_api=True, dry_run=bool(envelope.get("dryRun")))


async def openai_chat(request: web.Request) -> web.StreamResponse:
    books = request.app[BOOKS]
    if not _authorized(books, request):
        return _openai_error(401, "invalid API key", "authentication_error", "invalid_api_key")
    try:
        body = await request.json()
    except ValueError:
        return _openai_error(400, "the body is not JSON", "invalid_request_error")
    return await _serve_chat(request, body, run_api=False, dry_run=False)


async def openai_models(request: web.Request) -> web.StreamResponse:
    request.app[BOOKS].counters["openai.models"] += 1
    return _json(_models_list())


async def balance(request: web.Request) -> web.StreamResponse:
    books = request.app[BOOKS]
    if not _authorized(books, request):
        return _run_error(401, "UNAUTHORIZED", "missing or invalid API key")
    return _json({"balance": books.stats()["balance"], "currency": "USD"})


async def transactions(request: web.Request) -> web.StreamResponse:
    books = request.app[BOOKS]
    if not _authorized(books, request):
        return _run_error(401, "UNAUTHORIZED", "missing or invalid API key")
    if not books.lists_transactions:
        return _run_error(404, "NOT_FOUND", "this provider reports a balance only")
    return _json({"transactions": books.transactions, "charged": books.stats()["charged"]})


async def control_config(request: web.Request) -> web.StreamResponse:
    books = request.app[BOOKS]
    books.configure(await request.json())
    return _json(books.stats())


async def control_stats(request: web.Request) -> web.StreamResponse:
    return _json(request.app[BOOKS].stats())


def make_app(books: Books) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[BOOKS] = books
    app.router.add_post("/v1/run", run_api)
    app.router.add_get("/v1/credits/balance", balance)
    app.router.add_get("/v1/credits/transactions", transactions)
    app.router.add_post("/v1/chat/completions", openai_chat)
    app.router.add_get("/v1/models", openai_models)
    batches.add_routes(app, books)
    app.router.add_post("/_sim/config", control_config)
    app.router.add_get("/_sim/stats", control_stats)
    return app
