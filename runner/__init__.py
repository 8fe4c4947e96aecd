"""runner: a cost-aware batch job runner for LLM chat requests."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from runner.connect import Connection, ProviderSettings, connect
from runner.engine import RunOptions
from runner.export import export_jsonl, export_parquet, lazy_run
from runner.jobs import JobSummary, read_job, validate_job
from runner.ledger import Ledger
from runner.models import ChatRequest, Outcome, Quote, Usage
from runner.quote import Estimate, quote_requests
from runner.report import per_model, run_frame, top_errors
from runner.run import RunResult, run_job


async def run_simulated(job: str | Path, max_usd: str = "1.00", ledger: Ledger | None = None) -> RunResult:
    """Run a job end to end on an in-process simulator (for notebooks and trying runner out)."""
    async with connect(ProviderSettings(name="simulator")) as conn:
        return await run_job(Path(job), conn=conn, ledger=ledger or Ledger(), max_usd=Decimal(max_usd))


__all__ = [
    "ChatRequest",
    "Connection",
    "Estimate",
    "JobSummary",
    "Ledger",
    "Outcome",
    "ProviderSettings",
    "Quote",
    "RunOptions",
    "RunResult",
    "Usage",
    "connect",
    "export_jsonl",
    "export_parquet",
    "lazy_run",
    "per_model",
    "quote_requests",
    "read_job",
    "run_frame",
    "run_job",
    "run_simulated",
    "top_errors",
    "validate_job",
]
