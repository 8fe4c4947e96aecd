"""A provider's Batch API, as OpenAI defines it: a JSONL file uploaded (`POST /files`, purpose
`batch`), a batch made of it (`POST /batches`), looked at (`GET /batches/{id}`, `GET /batches`),
cancelled, and its output and error files read line by line (`GET /files/{id}/content`).

The lines' prices are the provider's batch prices (`ModelInfo.at_batch_prices`): quotes, holds and
charges of a batch run use them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from runner.core import codec
from runner.core.catalog import ModelInfo
from runner.core.config import RetryPolicy
from runner.core.errors import RetryableError
from runner.core.models import JSON, ChatRequest, Outcome, Quote, Usage
from runner.providers import http
from runner.providers.base import error_from_response, table_quote, transport_error, usage_price
from runner.providers.retry import retrying

CHAT_URL = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
COMPLETION_WINDOW_S = 24 * 3600.0
MAX_LINES = 50_000  # a batch's file: at most this many requests
MAX_BYTES = 200 * 1024 * 1024  # and this many bytes
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
LIST_PAGE = 100


@dataclass(frozen=True)
class BatchState:
    """What the provider says of a batch."""

    id: str
    status: str
    total: int
    completed: int
    failed: int
    output_file_id: str | None
    error_file_id: str | None
    metadata: dict[str, str]
    created_at: float

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def of(cls, payload: JSON) -> BatchState:
        counts = payload.get("request_counts") or {}
        return cls(
            id=str(payload["id"]),
            status=str(payload.get("status")),
            total=int(counts.get("total") or 0),
            completed=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            output_file_id=payload.get("output_file_id"),
            error_file_id=payload.get("error_file_id"),
            metadata={str(k): str(v) for k, v in (payload.get("metadata") or {}).items()},
            created_at=float(payload.get("created_at") or 0),
        )


def batch_line(request: ChatRequest) -> bytes:
    """A job line as a line of a batch's input file: the job's custom_id, the body as sent (a batch
    answer is never streamed)."""
    body = {k: v for k, v in request.body.items() if k not in ("stream", "stream_options")}
    line = {"custom_id": request.custom_id, "method": "POST", "url": CHAT_URL, "body": body}
    return codec.dumps(line) + b"\n"


class BatchClient:
    """The Batch API of one endpoint (its base URL ends in /v1), with its batch prices."""

    def __init__(
        self, endpoint: http.Endpoint, secret: http.Secret, prices: dict[str, ModelInfo], policy: RetryPolicy
    ) -> None:
        self._endpoint = endpoint
        self._secret = secret
        self.prices = prices
        self.policy = policy

    # ---- prices -------------------------------------------------------------------------------

    def batch_info(self, model: str) -> ModelInfo | None:
        info = self.prices.get(model)
        return None if info is None else info.at_batch_prices()

    def offers(self, model: str) -> bool:
        """Whether a batch price is known for the model."""
        return self.batch_info(model) is not None

    def quote(self, request: ChatRequest) -> Quote:
        """A true upper bound of the line at batch prices."""
        info = self.batch_info(request.model)
        if info is None:
            return Quote(
                amount=None, exact=False, source="price_table", reason="no batch price for the model"
            )
        return table_quote(request.body, info)

    def outcome(self, model: str, response: JSON, latency_s: float) -> Outcome:
        """A completed line's answer, priced at batch prices (and at the synchronous ones beside)."""
        body = response.get("body") or {}
        usage = Usage.from_openai(body.get("usage"))
        sync = self.prices.get(model)
        return Outcome(
            completion=body,
            usage=usage,
            price=usage_price(usage, self.batch_info(model)),
            latency_s=latency_s,
            request_id=None if response.get("request_id") is None else str(response["request_id"]),
            mode="batch",
            sync_price=usage_price(usage, sync),
        )

    # ---- calls --------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any = None, form: Any = None) -> http.Reply:
        """One Batch API call, retried while the error is retryable (none of these is billed)."""

        def note(_attempt: int, _wait: float, _error: BaseException | None) -> None:
            return None

        async for attempt in retrying(self.policy, note):
            with attempt:
                try:
                    reply = await self._endpoint.call(method, path, body, form=form() if form else None)
                except http.NetworkError as exc:
                    raise transport_error(exc, billable=False) from None
                if reply.status_code >= 400:
                    raise error_from_response(reply, self._secret)
                return reply
        raise AssertionError  # pragma: no cover - tenacity returns or re-raises

    async def _json(self, method: str, path: str, body: Any = None, form: Any = None) -> JSON:
        reply = await self._call(method, path, body, form)
        try:
            payload = reply.json()
        except ValueError:
            raise error_from_response(reply, self._secret) from None
        if not isinstance(payload, dict):
            msg = f"{path}: the provider's reply is not a JSON object"
            raise RetryableError(msg, status=reply.status_code)
        return payload

    async def upload(self, content: bytes, name: str) -> str:
        """The file's id at the provider."""

        def form() -> aiohttp.FormData:
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", content, filename=name, content_type="application/jsonl")
            return data

        return str((await self._json("POST", "files", form=form))["id"])

    async def create(self, file_id: str, metadata: dict[str, str]) -> BatchState:
        """A batch of the uploaded file. A failure after sending leaves it unknown whether the batch
        was made: the caller looks for it by its metadata before making it again."""
        body = {
            "input_file_id": file_id,
            "endpoint": CHAT_URL,
            "completion_window": COMPLETION_WINDOW,
            "metadata": metadata,
        }
        return BatchState.of(await self._json("POST", "batches", body))

    async def retrieve(self, batch_id: str) -> BatchState:
        return BatchState.of(await self._json("GET", f"batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchState:
        return BatchState.of(await self._json("POST", f"batches/{batch_id}/cancel"))

    async def find(self, metadata: dict[str, str], since: float) -> BatchState | None:
        """A batch made with this metadata (newest first, looking back to `since`, a time.time())."""
        after: str | None = None
        while True:
            path = f"batches?limit={LIST_PAGE}" + (f"&after={after}" if after else "")
            page = await self._json("GET", path)
            data = [BatchState.of(item) for item in page.get("data") or [] if isinstance(item, dict)]
            for state in data:
                if all(state.metadata.get(k) == v for k, v in metadata.items()):
                    return state
            if not data or not page.get("has_more") or data[-1].created_at < since:
                return None
            after = data[-1].id

    async def lines(self, file_id: str) -> AsyncIterator[JSON]:
        """The lines of an output or error file, read as they come."""
        started = time.monotonic()
        try:
            async with self._endpoint.stream("GET", f"files/{file_id}/content") as reply:
                if reply.status_code >= 400:
                    raise error_from_response(await reply.read(), self._secret)
                async for raw in reply.lines():
                    if raw.strip():
                        yield codec.loads(raw)
        except http.NetworkError as exc:
            raise transport_error(exc, billable=False) from None
        except ValueError as exc:
            msg = f"file {file_id}: an unreadable line after {time.monotonic() - started:.1f} s ({exc})"
            raise RetryableError(msg) from None


def line_error(line: JSON) -> tuple[str, str]:
    """(error type, message) of an output or error file's line that is not an answer."""
    error = line.get("error")
    if isinstance(error, dict):
        return str(error.get("code") or "batch_error"), str(error.get("message") or error)
    response = line.get("response") or {}
    body = response.get("body") if isinstance(response, dict) else None
    status = response.get("status_code") if isinstance(response, dict) else None
    inner = body.get("error") if isinstance(body, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    return f"http_{status}", str(message or body or "no answer")


def answered(line: JSON) -> bool:
    response = line.get("response")
    return isinstance(response, dict) and response.get("status_code") == 200 and not line.get("error")


__all__ = [
    "COMPLETION_WINDOW_S",
    "MAX_BYTES",
    "MAX_LINES",
    "BatchClient",
    "BatchState",
    "answered",
    "batch_line",
    "line_error",
]


class BatchQuoted:
    """A provider whose quotes are at its batch prices (what a batch run holds); the rest is the
    provider's own."""

    dry_runs = False

    def __init__(self, provider: Any, client: BatchClient) -> None:
        self._provider, self._client = provider, client
        self.name = provider.name

    async def quote(self, request: ChatRequest) -> Quote:
        return self._client.quote(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)
