"""Ledger → Parquet (polars), one row per request, streamed in batches so memory stays flat."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
from polars.io.plugins import register_io_source

from runner.core import codec
from runner.core.result import exported_fields
from runner.ledger import Ledger

MONEY = pl.Decimal(18, 9)
TS = pl.Datetime("us", "UTC")
POLARS = {int: pl.Int64, float: pl.Float64, str: pl.String}


def schema() -> dict[str, Any]:
    """The Parquet's columns and types (ARCHITECTURE §5), the result's fields among them."""
    return {**_HEAD, **_result(), **_TAIL}


def ledger_columns() -> dict[str, Any]:
    """What frames() reads from the ledger, in this order (the response JSON is not part of the table)."""
    return {**_READ_HEAD, **_result(), **_READ_TAIL}


def _result() -> dict[str, Any]:
    """A request's result fields (runner.core.result): in the ledger and the Parquet under one name."""
    return {f.name: POLARS[f.kind] for f in exported_fields()}


_HEAD: dict[str, Any] = {
    "run_id": pl.String,
    "custom_id": pl.String,
    "line": pl.Int64,
    "model": pl.String,
    "status": pl.String,
}
_TAIL: dict[str, Any] = {
    "total_tokens": pl.Int64,
    "quote_usd": MONEY,
    "quote_kind": pl.String,  # exact (a dry run) | upper_bound (a price table's) | tokenized (prompt counted)
    "price_usd": MONEY,
    "cached": pl.Boolean,  # answered from the ledger (an earlier run's answer, or an identical line's): $0
    "attempts": pl.Int64,
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
_READ_HEAD: dict[str, Any] = {
    "run_id": pl.String,
    "custom_id": pl.String,
    "line": pl.Int64,
    "model": pl.String,
    "state": pl.String,
}
_READ_TAIL: dict[str, Any] = {
    "quote_nanos": pl.Int64,
    "quote_exact": pl.Int64,  # SQLite keeps a boolean as 0 or 1
    "quote_source": pl.String,
    "price_nanos": pl.Int64,
    "cached_from": pl.Int64,
    "attempts": pl.Int64,
    "started_at": pl.String,
    "finished_at": pl.String,
    "error_type": pl.String,
    "error_message": pl.String,
    "sha256": pl.String,
    "metadata_json": pl.String,
}
STORED_TIME = "%Y-%m-%d %H:%M:%S%.f"  # how the ledger stores UTC (runner.ledger.db.STORED_TIME)
BATCH = 10_000  # rows in one Parquet row group
READ_BATCH = 2_000  # rows read from the ledger at a time (10,000 at a time cost ~25 MB more at the peak)


def _usd(column: str) -> pl.Expr:
    """Integer nano-USD → decimal(18, 9) USD, exactly (decimal division, no float on the way)."""
    nanos = pl.col(column).cast(pl.Decimal(38, 9)) / pl.lit(1_000_000_000, dtype=pl.Decimal(38, 0))
    return nanos.cast(MONEY)


def _utc(column: str) -> pl.Expr:
    return pl.col(column).str.to_datetime(STORED_TIME, time_unit="us", time_zone="UTC")


def _table(raw: pl.DataFrame, provider: str, columns: dict[str, Any]) -> pl.DataFrame:
    """Ledger columns → the §5 Parquet schema."""
    sent = pl.col("state").is_in(list(STATUS))
    return (
        raw.with_columns(
            status=pl.col("state").replace_strict(STATUS, default="skipped"),
            total_tokens=pl.col("prompt_tokens") + pl.col("completion_tokens").fill_null(0),
            quote_usd=_usd("quote_nanos"),
            quote_kind=pl.when(pl.col("quote_nanos").is_null())
            .then(None)
            .when(pl.col("quote_exact") == 1)
            .then(pl.lit("exact"))
            .when(pl.col("quote_source") == "tokenized")
            .then(pl.lit("tokenized"))
            .otherwise(pl.lit("upper_bound")),
            price_usd=_usd("price_nanos"),
            cached=pl.col("cached_from").is_not_null(),
            started_at=_utc("started_at"),
            finished_at=_utc("finished_at"),
            error_type=pl.coalesce("error_type", pl.when(~sent).then(pl.lit("not_sent"))),
            error_message=pl.coalesce("error_message", pl.when(~sent).then(pl.lit(NOT_SENT))),
            provider=pl.lit(provider, dtype=pl.String),
        )
        .rename({"sha256": "request_sha256", "metadata_json": "metadata"})
        .select(list(columns))
        .cast(pl.Schema(columns))
    )


def frames(ledger: Ledger, run_id: str, batch: int = BATCH) -> Iterator[pl.DataFrame]:
    """The run's rows in the §5 schema, a batch at a time, in line order."""
    run = ledger.run(run_id)
    provider = str(run.provider).split(":", 1)[0]
    read, columns = ledger_columns(), schema()
    for rows in ledger.iter_request_tuples(run.id, list(read), batch):
        yield _table(_columns(rows, read), provider, columns)


def _columns(rows: list[tuple[Any, ...]], read: dict[str, Any]) -> pl.DataFrame:
    """Ledger tuples → a frame of the `read` columns, built column by column (a third of the time
    polars takes to read the same tuples as rows)."""
    if not rows:
        return pl.DataFrame(schema=read)
    columns = zip(read.items(), zip(*rows, strict=True), strict=True)
    return pl.DataFrame([pl.Series(name, values, dtype=kind) for (name, kind), values in columns])


def lazy_run(ledger: Ledger, run_id: str) -> pl.LazyFrame:
    """The run's rows in the §5 schema as a LazyFrame, read from the ledger a batch at a time when it
    is collected or sunk (its projection, filter and row limit are applied batch by batch)."""

    def batches(
        columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, _size: int | None
    ) -> Iterator[pl.DataFrame]:
        left = n_rows
        for frame in frames(ledger, run_id, READ_BATCH):
            part = frame if predicate is None else frame.filter(predicate)
            if left is not None:
                part = part.head(left)
                left -= part.height
            yield part if columns is None else part.select(columns)
            if left == 0:
                return

    return register_io_source(batches, schema=schema(), explain_name="runner ledger")


def export_parquet(ledger: Ledger, run_id: str, path: Path) -> int:
    """Write the run to Parquet, streamed from the ledger into row groups of BATCH rows (no part
    files, nothing read back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lazy_run(ledger, run_id).sink_parquet(path, row_group_size=BATCH)
    return int(pl.scan_parquet(path).select(pl.len()).collect().item())  # from the file's footer


def export_jsonl(ledger: Ledger, run_id: str, path: Path) -> int:
    """The OpenAI Batch output shape: {id, custom_id, response: {status_code, request_id, body}, error}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    run = ledger.run(run_id)
    with path.open("w") as handle:
        for rows in ledger.iter_request_rows(run.id):
            for row in rows:
                handle.write(json.dumps(batch_line(row)) + "\n")
                count += 1
    return count


def batch_line(row: dict[str, Any]) -> dict[str, Any]:
    ok = row["state"] == "ok" and row["response_json"]
    body = codec.loads(row["response_json"]) if ok else None
    return {
        "id": f"batch_req_{row['run_id']}_{row['id']}",
        "custom_id": row["custom_id"],
        "response": (
            {"status_code": 200, "request_id": (body or {}).get("id"), "body": body} if ok else None
        ),
        "error": None if ok else {"code": row["error_type"] or row["state"], "message": row["error_message"]},
    }
