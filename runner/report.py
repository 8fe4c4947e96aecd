"""Per-model summaries of a run, as polars DataFrames (the CLI renders them)."""

from __future__ import annotations

import polars as pl

from runner.export import frames
from runner.ledger import Ledger


def run_frame(ledger: Ledger, run_id: str) -> pl.DataFrame:
    parts = list(frames(ledger, run_id))
    return pl.concat(parts) if parts else pl.DataFrame()


def per_model(df: pl.DataFrame) -> pl.DataFrame:
    """requests ok/failed/possibly billed, tokens, quoted vs charged USD, latency, cost per 1k out."""
    if df.is_empty():
        return df
    return (
        df.group_by("model")
        .agg(
            ok=(pl.col("status") == "ok").sum(),
            failed=(pl.col("status") == "failed").sum(),
            possibly_billed=(pl.col("status") == "possibly_billed").sum(),
            skipped=(pl.col("status") == "skipped").sum(),
            prompt_tokens=pl.col("prompt_tokens").sum(),
            completion_tokens=pl.col("completion_tokens").sum(),
            reasoning_tokens=pl.col("reasoning_tokens").sum(),
            quoted_usd=pl.col("quote_usd").filter(pl.col("status") == "ok").sum(),
            charged_usd=pl.col("price_usd").sum(),
            latency_p50=pl.col("latency_s").quantile(0.5),
            latency_p95=pl.col("latency_s").quantile(0.95),
        )
        .with_columns(
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
        )
        .sort("model")
    )


def top_errors(df: pl.DataFrame, limit: int = 5) -> pl.DataFrame:
    if df.is_empty():
        return df
    return (
        df.filter(pl.col("error_type").is_not_null())
        .group_by("error_type")
        .agg(count=pl.len(), example=pl.col("error_message").first())
        .sort("count", descending=True)
        .head(limit)
    )
