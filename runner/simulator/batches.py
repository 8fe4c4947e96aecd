"""The simulator's Batch API, in OpenAI's shapes: files (`POST /v1/files`, `GET /v1/files/{id}/content`)
and batches (create, retrieve, cancel, list). A batch moves by the clock: validating, in_progress with
its lines completing evenly over `batch_duration` seconds, then completed; it expires at
`batch_expire_fraction` when that knob was set as it was created; a cancelled one delivers what had
completed. Its output is made once, when it ends: each completed line charged once at batch prices
(half the synchronous ones), with the line's custom_id and the batch's id in the books."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

from runner.core import catalog, schema
from runner.simulator.books import Books
from runner.simulator.fakes import generate

BATCH_DISCOUNT = Decimal("0.5")  # the simulator's batch prices: half its synchronous ones
VALIDATING_S = 0.2  # a new batch reads `validating` this long
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
CHAT_URL = "/v1/chat/completions"


@dataclass
class SimBatch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    lines: list[dict[str, Any]]
    created_at: float
    duration: float
    expire_fraction: float | None  # taken from the knob as the batch was created
    status: str = "validating"
    cancel_at: float | None = None  # when a cancel was asked
    done: int = 0  # lines completed (their output made) when it ended
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    ended_at: float | None = None

    def shape(self) -> dict[str, Any]:
        """The batch object, as OpenAI returns it."""
        stamp = int(self.created_at)
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": stamp,
            "in_progress_at": stamp if self.status != "validating" else None,
            "expires_at": stamp + 24 * 3600,
            "completed_at": int(self.ended_at) if self.status == "completed" and self.ended_at else None,
            "failed_at": None,
            "expired_at": int(self.ended_at) if self.status == "expired" and self.ended_at else None,
            "cancelling_at": int(self.cancel_at) if self.cancel_at else None,
            "cancelled_at": int(self.ended_at) if self.status == "cancelled" and self.ended_at else None,
            "request_counts": dict(self.counts),
            "metadata": self.metadata,
        }


@dataclass
class BatchDesk:
    """The simulator's files and batches."""

    books: Books
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id → (purpose, content)
    batches: dict[str, SimBatch] = field(default_factory=dict)  # in creation order

    def advance(self, books: Books, batch: SimBatch, now: float) -> None:
        """Move a batch along by the clock; its output is made when it ends."""
        if batch.status in TERMINAL:
            return
        total = len(batch.lines)
        ran = max(0.0, now - batch.created_at - VALIDATING_S)
        fraction = 1.0 if batch.duration <= 0 else min(1.0, ran / batch.duration)
        if now - batch.created_at >= VALIDATING_S and batch.status == "validating":
            batch.status = "in_progress"
        if batch.cancel_at is not None:
            ran_then = max(0.0, batch.cancel_at - batch.created_at - VALIDATING_S)
            at_cancel = 1.0 if batch.duration <= 0 else min(1.0, ran_then / batch.duration)
            if batch.status == "cancelling":  # the second look at a cancelled batch finds it ended
                self._end(books, batch, "cancelled", math.floor(at_cancel * total), now)
            else:
                batch.status = "cancelling"
            return
        if batch.expire_fraction is not None and fraction >= batch.expire_fraction:
            self._end(books, batch, "expired", math.ceil(batch.expire_fraction * total), now)
        elif fraction >= 1.0:
            self._end(books, batch, "completed", total, now)
        elif batch.status == "in_progress":
            batch.counts["completed"] = math.floor(fraction * total)

    def _end(self, books: Books, batch: SimBatch, status: str, done: int, now: float) -> None:
        out, errors = [], []
        completed = failed = 0
        for index, line in enumerate(batch.lines):
            custom_id = line.get("custom_id")
            line_id = f"batch_req_{uuid.uuid4().hex[:20]}"
            if index >= done:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                message = f"this request could not be executed before the batch was {status} (simulated)"
                errors.append(
                    {
                        "id": line_id,
                        "custom_id": custom_id,
                        "response": None,
                        "error": {"code": code, "message": message},
                    }
                )
                failed += 1
                continue
            reply = _answer_line(books, batch, line)
            entry = {"id": line_id, "custom_id": custom_id, "response": reply, "error": None}
            if reply["status_code"] == 200:
                out.append(entry)
                completed += 1
            else:
                errors.append(entry)
                failed += 1
        batch.output_file_id = self._keep(out, "batch_output") if out else None
        batch.error_file_id = self._keep(errors, "batch_output") if errors else None
        batch.counts = {"total": len(batch.lines), "completed": completed, "failed": failed}
        batch.status, batch.done, batch.ended_at = status, done, now
        books.counters[f"batch.{status}"] += 1

    def _keep(self, lines: list[dict[str, Any]], purpose: str) -> str:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = (purpose, "".join(json.dumps(line) + "\n" for line in lines).encode())
        return file_id


def _answer_line(books: Books, batch: SimBatch, line: dict[str, Any]) -> dict[str, Any]:
    """One completed line's response (charged), or an error response (not charged)."""
    request_id = f"req_{uuid.uuid4().hex[:16]}"
    body = line.get("body")
    if line.get("url") != batch.endpoint or not isinstance(body, dict):
        return _line_error(400, request_id, "the line's url or body is not a chat completion request")
    problems = schema.check_body(body)
    if problems:
        return _line_error(400, request_id, "; ".join(f"{f}: {m}" for f, m in problems[:5]))
    if books.batch_line_error_rate and books.rng.random() < books.batch_line_error_rate:
        books.counters["batch.line_error"] += 1
        return _line_error(500, request_id, "simulated server error on this line")
    fake = generate(body, catalog.get(body["model"]))
    price = books.charge_for(body["model"], fake.prompt_tokens, fake.completion_tokens) * BATCH_DISCOUNT
    charged = books.charge(
        price,
        model=body["model"],
        endpoint="batch",
        body_sha="",
        custom_id=str(line.get("custom_id")),
        batch_id=batch.id,
    )
    if charged is None:
        return _line_error(402, request_id, "insufficient credits (simulated)", "insufficient_quota")
    completion = {
        "id": f"chatcmpl-{charged}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": fake.content, **_extras(fake)},
                "finish_reason": fake.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": fake.usage(),
    }
    return {"status_code": 200, "request_id": charged, "body": completion}


def _extras(fake: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if fake.reasoning:
        extra["reasoning_content"] = fake.reasoning
    if fake.tool_calls:
        extra["tool_calls"] = fake.tool_calls
    return extra


def _line_error(status: int, request_id: str, message: str, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status == 400 else "server_error"
    return {
        "status_code": status,
        "request_id": request_id,
        "body": {"error": {"message": message, "type": kind, "param": None, "code": code}},
    }


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    payload = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return web.json_response(payload, status=status)


DESK: web.AppKey[BatchDesk] = web.AppKey("batch_desk", BatchDesk)


def _parts(request: web.Request) -> tuple[Books, BatchDesk]:
    desk = request.app[DESK]
    return desk.books, desk


async def upload_file(request: web.Request) -> web.StreamResponse:
    books, desk = _parts(request)
    if not books.authorized(request.headers.get("Authorization", "")):
        return _error(401, "invalid API key", "invalid_api_key")
    form = await request.post()
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, web.FileField) or not isinstance(purpose, str):
        return _error(400, "give 'file' and 'purpose' as multipart fields")
    content = upload.file.read()
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    desk.files[file_id] = (purpose, content)
    books.counters["files.created"] += 1
    return web.json_response(
        {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": upload.filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
    )


async def file_content(request: web.Request) -> web.StreamResponse:
    books, desk = _parts(request)
    if not books.authorized(request.headers.get("Authorization", "")):
        return _error(401, "invalid API key", "invalid_api_key")
    found = desk.files.get(request.match_info["file_id"])
    if found is None:
        return _error(404, f"No such File object: {request.match_info['file_id']}")
    return web.Response(body=found[1], content_type="application/octet-stream")


async def create_batch(request: web.Request) -> web.StreamResponse:
    books, desk = _parts(request)
    if not books.authorized(request.headers.get("Authorization", "")):
        return _error(401, "invalid API key", "invalid_api_key")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body is not JSON")
    found = desk.files.get(str(body.get("input_file_id")))
    if found is None:
        return _error(400, f"No such File object: {body.get('input_file_id')}")
    if body.get("endpoint") != CHAT_URL or body.get("completion_window") != "24h":
        return _error(400, "endpoint must be /v1/chat/completions and completion_window '24h'")
    try:
        lines = [json.loads(text) for text in found[1].decode().splitlines() if text.strip()]
    except ValueError:
        return _error(400, "the input file is not JSONL", "invalid_file")
    if len(lines) > books.batch_max_requests:
        message = (
            f"The batch input file has {len(lines)} requests, above the limit of "
            f"{books.batch_max_requests} per batch"
        )
        return _error(400, message, "batch_too_large")
    batch = SimBatch(
        id=f"batch_{uuid.uuid4().hex[:24]}",
        input_file_id=str(body["input_file_id"]),
        endpoint=CHAT_URL,
        completion_window="24h",
        metadata=body.get("metadata"),
        lines=lines,
        created_at=time.time(),
        duration=books.batch_duration,
        expire_fraction=books.batch_expire_fraction,
    )
    batch.counts["total"] = len(lines)
    books.batch_expire_fraction = None  # the knob holds for the next batch only
    desk.batches[batch.id] = batch
    books.counters["batches_created"] += 1
    return web.json_response(batch.shape())


def _named_batch(request: web.Request) -> tuple[Books, BatchDesk, SimBatch] | web.Response:
    """The batch the path names, moved along by the clock; or the error reply."""
    books, desk = _parts(request)
    if not books.authorized(request.headers.get("Authorization", "")):
        return _error(401, "invalid API key", "invalid_api_key")
    batch = desk.batches.get(request.match_info["batch_id"])
    if batch is None:
        return _error(404, f"No batch found with id '{request.match_info['batch_id']}'.")
    desk.advance(books, batch, time.time())
    return books, desk, batch


async def get_batch(request: web.Request) -> web.StreamResponse:
    found = _named_batch(request)
    return found if isinstance(found, web.Response) else web.json_response(found[2].shape())


async def cancel_batch(request: web.Request) -> web.StreamResponse:
    found = _named_batch(request)
    if isinstance(found, web.Response):
        return found
    batch, now = found[2], time.time()
    if batch.status not in TERMINAL and batch.cancel_at is None:
        batch.cancel_at = now
        batch.status = "cancelling"
    return web.json_response(batch.shape())


async def list_batches(request: web.Request) -> web.StreamResponse:
    """Newest first, `limit` at a time after the id `after`."""
    books, desk = _parts(request)
    if not books.authorized(request.headers.get("Authorization", "")):
        return _error(401, "invalid API key", "invalid_api_key")
    limit = max(1, min(100, int(request.query.get("limit", "20"))))
    newest = list(reversed(desk.batches.values()))
    after = request.query.get("after")
    if after:
        ids = [b.id for b in newest]
        newest = newest[ids.index(after) + 1 :] if after in ids else []
    now = time.time()
    page = newest[:limit]
    for batch in page:
        desk.advance(books, batch, now)
    data = [b.shape() for b in page]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(newest) > limit,
        }
    )


def add_routes(app: web.Application, books: Books) -> None:
    app[DESK] = BatchDesk(books)
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
