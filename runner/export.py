"""Ledger → Parquet (polars), one row per request, streamed in batches so memory stays flat."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from datetime import UTC
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl

from runner.ledger import Ledger
from runner.money import from_nanos

MONEY = pl.Decimal(18, 9)
TS = pl.Datetime("us", "UTC")
SCHEMA: dict[str, Any] = {
    "run_id": pl.String,
    "custom_id": pl.String,
    "line": pl.Int64,
    "model": pl.String,
    "status": pl.String,
    "content": pl.String,
    "reasoning_content": pl.String,
    "tool_calls": pl.String,
    "finish_reason": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "reasoning_tokens": pl.Int64,
    "cached_tokens": pl.Int64,
    "total_tokens": pl.Int64,
    "quote_usd": MONEY,
    "price_usd": MONEY,
    "attempts": pl.Int64,
    "latency_s": pl.Float64,
    "first_token_s": pl.Float64,
    "started_at": TS,
    "finished_at": TS,
    "error_type": pl.String,
    "error_message": pl.String,
    "request_sha256": pl.String,
    "provider": pl.String,
    "metadata": pl.String,
}
STATUS = {"ok": "ok", "failed": "failed", "possibly_billed": "possibly_billed"}
NOT_SENT = "not sent: the run stopped before this request (run the job again to resume)"


def _usd(nanos: int | None) -> Decimal | None:
    return None if nanos is None else from_nanos(int(nanos))


def _utc(value: Any) -> Any:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _row(row: dict[str, Any], provider: str) -> dict[str, Any]:
    prompt, completion = row["prompt_tokens"], row["completion_tokens"]
    return {
        "run_id": row["run_id"],
        "custom_id": row["custom_id"],
        "line": row["line"],
        "model": row["model"],
        "status": STATUS.get(row["state"], "skipped"),
        "content": row["content"],
        "reasoning_content": row["reasoning_content"],
        "tool_calls": row["tool_calls"],
        "finish_reason": row["finish_reason"],
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "reasoning_tokens": row["reasoning_tokens"],
        "cached_tokens": row["cached_tokens"],
        "total_tokens": None if prompt is None else prompt + (completion or 0),
        "quote_usd": _usd(row["quote_nanos"]),
        "price_usd": _usd(row["price_nanos"]),
        "attempts": row["attempts"],
        "latency_s": row["latency_s"],
        "first_token_s": row["first_token_s"],
        "started_at": _utc(row["started_at"]),
        "finished_at": _utc(row["finished_at"]),
        "error_type": row["error_type"] or (None if row["state"] in STATUS else "not_sent"),
        "error_message": row["error_message"] or (None if row["state"] in STATUS else NOT_SENT),
        "request_sha256": row["sha256"],
        "provider": provider,
        "metadata": row["metadata_json"],
    }


def frames(ledger: Ledger, run_id: str, batch: int = 20_000) -> Iterator[pl.DataFrame]:
    run = ledger.run(run_id)
    provider = str(run["provider"]).split(":", 1)[0]
    for rows in ledger.iter_request_rows(run["id"], batch):
        yield pl.DataFrame([_row(r, provider) for r in rows], schema=SCHEMA, orient="row")


def export_parquet(ledger: Ledger, run_id: str, path: Path) -> int:
    """Write the run to Parquet: batches go to part files, then one streamed sink joins them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        parts: list[Path] = []
        for frame in frames(ledger, run_id):
            part = Path(tmp) / f"part-{len(parts):06d}.parquet"
            frame.write_parquet(part)
            parts.append(part)
            count += frame.height
        if not parts:
            pl.DataFrame(schema=SCHEMA).write_parquet(path)
            return 0
        pl.scan_parquet(parts).sink_parquet(path)
    return count


def export_jsonl(ledger: Ledger, run_id: str, path: Path) -> int:
    """The OpenAI Batch output shape: {id, custom_id, response: {status_code, request_id, body}, error}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    run = ledger.run(run_id)
    with path.open("w") as handle:
        for rows in ledger.iter_request_rows(run["id"]):
            for row in rows:
                handle.write(json.dumps(batch_line(row)) + "\n")
                count += 1
    return count


def batch_line(row: dict[str, Any]) -> dict[str, Any]:
    ok = row["state"] == "ok" and row["response_json"]
    body = json.loads(row["response_json"]) if ok else None
    return {
        "id": f"batch_req_{row['run_id']}_{row['id']}",
        "custom_id": row["custom_id"],
        "response": (
            {"status_code": 200, "request_id": (body or {}).get("id"), "body": body} if ok else None
        ),
        "error": None if ok else {"code": row["error_type"] or row["state"], "message": row["error_message"]},
    }
