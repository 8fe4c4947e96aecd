"""--json documents for scripts (money as decimal strings), and the reconciliation's and the
workers' tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from rich.table import Table

from runner.app.quote import Estimate
from runner.app.reconcile import BudgetReconciliation, Reconciliation
from runner.app.report import REPORT_NEEDS, run_frame, summarize
from runner.cli.console import ERRORS_SHOWN, out, text_table
from runner.core.errors import (
    printable,
)
from runner.core.money import format_usd, from_nanos
from runner.ledger import BudgetView, Ledger, PartView, RunView, WorkerView


def usd(nanos: int) -> str:
    return f"{from_nanos(nanos):f}"


def print_json(data: Any) -> None:
    out.print(json.dumps(data, indent=2, default=str), markup=False, highlight=False, soft_wrap=True)


def budget_json(view: BudgetView) -> dict[str, Any]:
    return {
        "name": view.name,
        "limit_usd": usd(view.limit_nanos),
        "spent_usd": usd(view.spent_nanos),
        "reserved_usd": usd(view.reserved_nanos),
        "possibly_billed_usd": usd(view.possibly_billed_nanos),
        "remaining_usd": usd(view.remaining_nanos),
    }


def run_json(run: RunView) -> dict[str, Any]:
    return {
        "id": run.id,
        "job": run.job_path,
        "provider": run.provider,
        "state": run.state,
        "reason": run.reason,
        "total": run.total,
        "states": dict(sorted(run.states.items())),
        "spent_usd": usd(run.spent_nanos),
        "created_at": run.created_at.isoformat() if run.created_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }


def mode_json(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    """The run's answers by how they were bought, with what batches saved against call prices."""
    return [
        {
            "mode": mode,
            "answers": answers,
            "charged_usd": usd(charged),
            "as_calls_usd": usd(as_calls),
            "saved_usd": usd(as_calls - charged),
        }
        for mode, answers, charged, as_calls in ledger.by_mode(run_id)
    ]


def batches_json(parts: list[PartView]) -> list[dict[str, Any]]:
    return [
        {
            "part": p.number,
            "batch_id": p.batch_id,
            "state": p.state,
            "status": p.status,
            "lines": p.lines,
            "completed": p.completed,
            "failed": p.failed,
            "created_at": p.created_at.isoformat() if p.created_at else None,
        }
        for p in parts
    ]


def batches_table(parts: list[PartView]) -> Table:
    """A run's provider batches: id, status, the provider's counts, age."""
    now = datetime.now(UTC)
    rows = [
        [
            str(p.number),
            p.batch_id or "(not made yet)",
            p.status or p.state,
            f"{p.lines:,}",
            f"{p.completed:,}",
            f"{p.failed:,}",
            _age((now - p.created_at).total_seconds()) if p.created_at else "",
        ]
        for p in parts
    ]
    return text_table("batches", ["part", "batch", "status", "lines", "completed", "failed", "age"], rows)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def worker_json(worker: WorkerView) -> dict[str, Any]:
    return {
        "id": worker.id,
        "host": worker.host,
        "pid": worker.pid,
        "state": worker.state,
        "sent": worker.sent,
        "ok": worker.ok,
        "failed": worker.failed,
        "per_minute": round(worker.per_minute, 1),
        "slots": worker.slots,
        "started_at": worker.started_at.isoformat() if worker.started_at else None,
        "seen_at": worker.seen_at.isoformat() if worker.seen_at else None,
    }


def workers_table(crew: list[WorkerView]) -> Table:
    """The workers of a run: where, what they sent, how fast, and their share of the concurrency."""
    rows = [
        [
            w.host,
            str(w.pid),
            w.state,
            f"{w.sent:,}",
            f"{w.ok:,}",
            f"{w.failed:,}",
            f"{w.per_minute:,.1f}",
            str(w.slots) if w.state == "running" else "",
            w.seen_at.strftime("%H:%M:%S") if w.seen_at else "",
        ]
        for w in crew
    ]
    columns = ["host", "pid", "state", "sent", "ok", "failed", "per min", "slots", "last seen (UTC)"]
    return text_table("workers", columns, rows)


def estimate_json(estimate: Estimate, remaining: int | None) -> dict[str, Any]:
    return {
        "total_usd": usd(estimate.total_nanos),
        "expected_usd": usd(estimate.expected_nanos),
        "expected_default": estimate.expect.guessed(estimate.per_model) if estimate.expect else [],
        "exact": estimate.exact,
        "unquoted": estimate.unquoted_count,
        "quote_calls": estimate.quote_calls,
        "from_cache": estimate.reused,
        "saved_usd": usd(estimate.saved_nanos),
        "per_model": {
            model: {
                "requests": q.requests,
                "quoted_usd": usd(q.nanos),
                "expected_usd": usd(q.expected_nanos),
                "tokenized": q.tokenized,
                "exact": q.exact,
                "unquoted": q.unknown,
            }
            for model, q in sorted(estimate.per_model.items())
        },
        "unquoted_examples": [{"custom_id": c, "reason": r} for c, r in estimate.unquoted[:ERRORS_SHOWN]],
        "budget_remaining_usd": None if remaining is None else usd(remaining),
    }


def report_json(ledger: Ledger, run: RunView) -> dict[str, Any]:
    frame = run_frame(ledger, run.id, REPORT_NEEDS)
    models, errors = summarize(frame.lazy()) if not frame.is_empty() else (frame, frame)

    def plain(row: dict[str, Any]) -> dict[str, Any]:
        return {k: (f"{v:f}" if isinstance(v, Decimal) else v) for k, v in row.items()}

    reused, saved = ledger.reused(run.id)
    return {
        "run": run_json(run),
        "models": [plain(row) for row in models.iter_rows(named=True)],
        "errors": [plain(row) for row in errors.iter_rows(named=True)],
        "from_cache": reused,
        "saved_usd": usd(saved),
        "modes": mode_json(ledger, run.id),
    }


def reconciliation_json(r: Reconciliation) -> dict[str, Any]:
    diff = r.difference_nanos
    return {
        "run_id": r.run_id,
        "budget": r.budget,
        "method": r.method,
        "matched": r.matched,
        "charged": r.charged,
        "not_charged": r.not_charged,
        "mismatched": [
            {"custom_id": c, "ledger_usd": usd(a), "provider_usd": usd(b)} for c, a, b in r.mismatched
        ],
        "ledger_usd": usd(r.ledger_nanos),
        "provider_usd": None if r.provider_nanos is None else usd(r.provider_nanos),
        "difference_usd": None if diff is None else usd(diff),
        "difference_nanos": diff,
        "agrees": r.ok if diff is not None else None,
        "note": r.note,
    }


def print_reconciliation(r: Reconciliation) -> None:
    how = {"transactions": "per request, from its charges", "balance": "by the balance's movement"}
    out.print(
        f"run {r.run_id} (budget '{printable(r.budget)}'), {how.get(r.method, r.method)}", highlight=False
    )
    if r.method == "transactions":
        out.print(
            f"  {r.matched:,} request(s) agree; possibly billed resolved: {r.charged:,} charged, "
            f"{r.not_charged:,} not charged (pending again: the next resume sends them)",
            highlight=False,
        )
    for custom_id, ledger_nanos, provider_nanos in r.mismatched[:ERRORS_SHOWN]:
        out.print(
            f"  differs: {printable(custom_id)}: ledger {format_usd(ledger_nanos, places=9)}, "
            f"provider {format_usd(provider_nanos, places=9)}",
            markup=False,
            highlight=False,
        )
    out.print(f"  ledger spent:   {format_usd(r.ledger_nanos, places=9)}", highlight=False)
    if r.provider_nanos is not None:
        diff = r.difference_nanos
        out.print(f"  provider books: {format_usd(r.provider_nanos, places=9)}", highlight=False)
        out.print(f"  difference:     {diff:+,} nano-USD", highlight=False)
    if r.note:
        out.print(f"  {r.note}", highlight=False)


def budget_reconciliation_json(b: BudgetReconciliation) -> dict[str, Any]:
    diff = b.difference_nanos
    return {
        "budget": b.budget.name,
        "runs": [reconciliation_json(r) for r in b.runs],
        "ledger_usd": usd(b.budget.spent_nanos),
        "provider_usd": None if b.provider_nanos is None else usd(b.provider_nanos),
        "difference_usd": None if diff is None else usd(diff),
        "difference_nanos": diff,
        "agrees": b.ok if diff is not None else None,
    }


def print_budget_reconciliation(b: BudgetReconciliation) -> None:
    out.print(f"budget '{printable(b.budget.name)}', {len(b.runs)} run(s)", highlight=False)
    out.print(f"  ledger spent:   {format_usd(b.budget.spent_nanos, places=9)}", highlight=False)
    if b.provider_nanos is None:
        out.print("  provider books: not known for every run (see above)", highlight=False)
        return
    out.print(f"  provider books: {format_usd(b.provider_nanos, places=9)}", highlight=False)
    out.print(f"  difference:     {b.difference_nanos:+,} nano-USD", highlight=False)
