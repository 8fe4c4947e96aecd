"""runner: a cost-aware batch job runner for LLM chat requests."""

from __future__ import annotations

import os

# polars' allocator (jemalloc) keeps freed pages for seconds by default: at the end of a
# million-request run the export and the report would stack on each other's freed memory (~30 MB
# higher peak). Returned at once instead; read when polars loads, so set before it is imported, and
# never over a setting of the user's own.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from runner.connect import Connection, ProviderSettings, connect
    from runner.engine import RunOptions, RunResult, run_job
    from runner.export import export_jsonl, export_parquet, lazy_run
    from runner.jobs import JobSummary, read_job, validate_job
    from runner.ledger import Ledger
    from runner.models import ChatRequest, Outcome, Quote, Usage
    from runner.quote import Estimate, quote_requests
    from runner.report import per_model, run_frame, top_errors

# The names below are loaded when first used: a process that needs a part of runner (a helper
# process validating a job) does not pay for loading the rest (the ledger, the engine, polars) first.
_HOME = {
    "runner.connect": ["Connection", "ProviderSettings", "connect"],
    "runner.engine": ["RunOptions", "RunResult", "run_job"],
    "runner.export": ["export_jsonl", "export_parquet", "lazy_run"],
    "runner.jobs": ["JobSummary", "read_job", "validate_job"],
    "runner.ledger": ["Ledger"],
    "runner.models": ["ChatRequest", "Outcome", "Quote", "Usage"],
    "runner.quote": ["Estimate", "quote_requests"],
    "runner.report": ["per_model", "run_frame", "top_errors"],
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        msg = f"module 'runner' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


async def run_simulated(job: str | Path, max_usd: str = "1.00", ledger: Ledger | None = None) -> RunResult:
    """Run a job end to end on an in-process simulator (for notebooks and trying runner out)."""
    from decimal import Decimal  # noqa: PLC0415 - loaded with what it runs
    from pathlib import Path  # noqa: PLC0415

    from runner.connect import ProviderSettings, connect  # noqa: PLC0415
    from runner.engine import run_job  # noqa: PLC0415
    from runner.ledger import Ledger  # noqa: PLC0415

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
