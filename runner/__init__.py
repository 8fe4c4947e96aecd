"""runner: a cost-aware batch job runner for LLM chat requests.

The public names below are loaded on first use, so that importing a small part (`runner.core.money`)
does not load the engine, the HTTP client or polars."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChatRequest": "runner.core.models",
    "Connection": "runner.providers.registry",
    "Estimate": "runner.app.quote",
    "JobSummary": "runner.core.jobs",
    "Ledger": "runner.ledger",
    "Outcome": "runner.core.models",
    "ProviderSettings": "runner.providers.registry",
    "Quote": "runner.core.models",
    "RunOptions": "runner.engine.engine",
    "RunResult": "runner.app.run",
    "Usage": "runner.core.models",
    "cell_report": "runner.app.compare",
    "connect": "runner.providers.registry",
    "export_jsonl": "runner.app.export",
    "export_parquet": "runner.app.export",
    "lazy_run": "runner.app.export",
    "load_spec": "runner.app.sweep",
    "per_model": "runner.app.report",
    "quote_requests": "runner.app.quote",
    "read_job": "runner.core.jobs",
    "run_frame": "runner.app.report",
    "run_job": "runner.app.run",
    "run_simulated": "runner.app.quick",
    "sweep": "runner.app.quick",
    "sweep_simulated": "runner.app.quick",
    "top_errors": "runner.app.report",
    "validate_job": "runner.core.jobs",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'runner' has no attribute '{name}'"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - names provided by __getattr__
