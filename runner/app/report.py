"""Per-model summaries of a run, as polars DataFrames (the CLI renders them)."""

from __future__ import annotations

from typing import Any, TypeVar

import polars as pl

from runner.app.export import frames
from runner.core.money import format_usd
from runner.ledger import Ledger

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)
COLUMNS = (
    "model",
    "ok",
    "failed",
    "possibly billed",
    "prompt tok",
    "output tok",
    "reasoning tok",
    "quoted",
    "charged",
    "drift",
    "p50 s",
    "p95 s",
    "$/1k out",
)


# what the per-model report, the errors and the HTML charts read: not the responses themselves
REPORT_NEEDS = (
    "model",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "quote_usd",
    "price_usd",
    "latency_s",
    "finished_at",
    "error_type",
    "error_message",
)


def run_frame(ledger: Ledger, run_id: str, columns: tuple[str, ...] | None = None) -> pl.DataFrame:
    """One row per request (polars); `columns` keeps only those, batch by batch, so a report of a
    million-request run holds its numbers, not its responses."""
    parts = [f if columns is None else f.select(columns) for f in frames(ledger, run_id)]
    return pl.concat(parts) if parts else pl.DataFrame()


def per_model(df: Frame) -> Frame:
    """requests ok/failed/possibly billed, tokens, quoted vs charged USD, latency, cost per 1k out."""
    if isinstance(df, pl.DataFrame) and df.is_empty():
        return df
    return _derived(df.group_by("model").agg(*_TOTALS, *_LATENCY))


_TOTALS = (
    (pl.col("status") == "ok").sum().alias("ok"),
    (pl.col("status") == "failed").sum().alias("failed"),
    (pl.col("status") == "possibly_billed").sum().alias("possibly_billed"),
    (pl.col("status") == "skipped").sum().alias("skipped"),
    pl.col("prompt_tokens").sum(),
    pl.col("completion_tokens").sum(),
    pl.col("reasoning_tokens").sum(),
    pl.col("quote_usd").filter(pl.col("status") == "ok").sum().alias("quoted_usd"),
    pl.col("price_usd").sum().alias("charged_usd"),
)
_LATENCY = (
    pl.col("latency_s").quantile(0.5).alias("latency_p50"),
    pl.col("latency_s").quantile(0.95).alias("latency_p95"),
)


def _derived(per_model_totals: Frame) -> Frame:
    return per_model_totals.with_columns(
        drift_pct=pl.when(pl.col("quoted_usd") > 0)
        .then(
            (pl.col("charged_usd") - pl.col("quoted_usd")).cast(pl.Float64)
            / pl.col("quoted_usd").cast(pl.Float64)
            * 100
        )
        .otherwise(None),
        usd_per_1k_output=pl.when(pl.col("completion_tokens") > 0)
        .then(pl.col("charged_usd").cast(pl.Float64) / pl.col("completion_tokens") * 1000)
        .otherwise(None),
    ).sort("model")


def top_errors(df: Frame, limit: int = 5) -> Frame:
    if isinstance(df, pl.DataFrame) and df.is_empty():
        return df
    return (
        df.filter(pl.col("error_type").is_not_null())
        .group_by("error_type")
        .agg(count=pl.len(), example=pl.col("error_message").first())
        .sort(["count", "error_type"], descending=[True, False])  # ties in a stable order
        .head(limit)
    )


def summarize(frame: pl.LazyFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """per_model() and top_errors() of a lazy frame (e.g. a scanned Parquet), aggregated as it
    streams: the report of a million-request run does not hold the run in memory."""
    # the totals and the latency quantiles in two passes (in one, polars holds ~2x the memory), the
    # model as a category (a million model names as text cost ~40 MB more)
    by_model = frame.with_columns(pl.col("model").cast(pl.Categorical)).group_by("model")
    totals = by_model.agg(*_TOTALS).collect(engine="streaming")
    latency = by_model.agg(*_LATENCY).collect(engine="streaming")
    joined = totals.join(latency, on="model", how="left").with_columns(pl.col("model").cast(pl.String))
    models = _derived(joined)
    return models, top_errors(frame).collect(engine="streaming")


def cells(row: dict[str, Any]) -> list[str]:
    """One row of per_model() as the texts of COLUMNS (the terminal and HTML reports both use it)."""
    return [
        str(row["model"]),
        str(row["ok"]),
        str(row["failed"]),
        str(row["possibly_billed"]),
        f"{row['prompt_tokens'] or 0:,}",
        f"{row['completion_tokens'] or 0:,}",
        f"{row['reasoning_tokens'] or 0:,}",
        format_usd(row["quoted_usd"], places=6),
        format_usd(row["charged_usd"], places=6),
        "–" if row["drift_pct"] is None else f"{row['drift_pct']:+.1f}%",
        _secs(row["latency_p50"]),
        _secs(row["latency_p95"]),
        "–" if row["usd_per_1k_output"] is None else f"${row['usd_per_1k_output']:.5f}",
    ]


def _secs(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
