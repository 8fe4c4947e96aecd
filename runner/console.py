"""What the command line shows: tables, the progress line, the report. With runner/cli.py the only
code that prints; both speak through rich."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from runner import catalog
from runner.errors import printable
from runner.events import Event, Funds, Notice, Phase, Quoted, RequestFinished
from runner.jobs import JobSummary
from runner.ledger import BudgetView, Ledger
from runner.money import format_usd
from runner.quote import Estimate
from runner.report import COLUMNS as REPORT_COLUMNS
from runner.report import REPORT_NEEDS, cells, run_frame, summarize

ERRORS_SHOWN = 20


class QuietConsole(Console):
    """A console that goes quiet when its reader has gone (`runner run … | tee log` and Ctrl-C, or
    `| head`): rich would end the program there, before the run drains and writes its Parquet."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.file.fileno())  # later writes, and the flush at exit, go nowhere
        os.close(devnull)


out = QuietConsole(width=None if sys.stdout.isatty() else 160)
err = QuietConsole(stderr=True, soft_wrap=True)


def summary_json(summary: JobSummary) -> dict[str, Any]:
    return {
        "file": summary.file,
        "ok": summary.ok,
        "requests": summary.requests,
        "per_model": dict(sorted(summary.per_model.items())),
        "error_count": summary.issue_count,
        "errors": [
            {"file": i.file, "line": i.line, "field": i.field, "message": i.message} for i in summary.issues
        ],
    }


def print_summary(summary: JobSummary) -> None:
    if not summary.ok:
        for issue in summary.issues[:ERRORS_SHOWN]:
            err.print(str(issue), markup=False, highlight=False)
        if summary.issue_count > ERRORS_SHOWN:
            err.print(f"… and {summary.issue_count - ERRORS_SHOWN} more", highlight=False)
        err.print(f"{summary.file}: invalid, {summary.issue_count} problem(s)", highlight=False)
        return
    table = Table(title=f"{summary.file}: valid", title_justify="left")
    table.add_column("model")
    table.add_column("requests", justify="right")
    for model, count in sorted(summary.per_model.items()):
        table.add_row(model, f"{count:,}")
    table.add_row("[b]total[/b]", f"[b]{summary.requests:,}[/b]")
    out.print(table)


def budget_table(views: list[BudgetView], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("budget", "limit", "spent", "reserved", "possibly billed", "remaining"):
        table.add_column(column, justify="left" if column == "budget" else "right", no_wrap=True)
    for v in views:
        table.add_row(
            v.name,
            *(
                format_usd(n)
                for n in (
                    v.limit_nanos,
                    v.spent_nanos,
                    v.reserved_nanos,
                    v.possibly_billed_nanos,
                    v.remaining_nanos,
                )
            ),
        )
    return table


def estimate_table(estimate: Estimate, remaining: int | None) -> Table:
    table = Table(title="quote", title_justify="left")
    for column in ("model", "requests", "quoted", "kind"):
        table.add_column(column, justify="left" if column in ("model", "kind") else "right", no_wrap=True)
    for model, q in sorted(estimate.per_model.items()):
        kind = "exact" if q.exact else "upper bound"
        if q.unknown:
            kind += f", {q.unknown} unquoted"
        table.add_row(model, f"{q.requests:,}", format_usd(q.nanos, places=6), kind)
    table.add_row(
        "[b]total[/b]",
        "",
        f"[b]{format_usd(estimate.total_nanos, places=6)}[/b]",
        "exact" if estimate.exact else "upper bound",
    )
    if remaining is not None:
        table.add_row("budget remaining", "", format_usd(remaining, places=6), "")
    return table


class Progress:
    """Rich progress on a terminal; a plain line every few seconds otherwise (logs, CI, pipes)."""

    LINE_EVERY_S = 5.0
    BAR_EVERY_S = 0.1

    def __init__(self, label: str, total: int) -> None:
        self.bar: RichProgress | None = None
        if err.is_terminal:
            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=err,
                transient=True,
            )
            self.task = self.bar.add_task(label, total=total, info="")
        self.funds: Funds | None = None
        self._begin(label, total)

    def _begin(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.done = self.failed = self.spent = 0
        self.started = time.monotonic()
        self.last_line = self.started
        if self.bar:
            self.bar.reset(self.task, total=total, description=label, info="")

    def __enter__(self) -> Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def __call__(self, event: Event) -> None:
        if isinstance(event, Notice):
            err.print(event.message, markup=False, highlight=False)
            return
        if isinstance(event, Phase):
            self._begin(event.name, event.total)
        elif isinstance(event, Funds):
            self.funds = event
        elif isinstance(event, Quoted):
            self.done += 1
        elif isinstance(event, RequestFinished):
            self.done += 1
            self.failed += event.state != "ok"
            self.spent += event.price_nanos
        else:
            return
        self._show()

    def status(self, now: float) -> str:
        elapsed = max(1e-6, now - self.started)
        rate = self.done / elapsed
        parts = [f"{self.failed} failed", f"{rate:,.0f}/s"]
        if self.label == "running":
            per_minute = self.spent * 60_000 // max(1, round(elapsed * 1000))  # integer nano-USD
            parts += [f"{format_usd(self.spent)} spent", f"{format_usd(per_minute)}/min"]
            if self.funds is not None:
                parts.append(f"{format_usd(self.funds.reserved_nanos)} reserved")
                parts.append(f"{format_usd(self.funds.remaining_nanos)} left in the budget")
        return " · ".join(parts)

    def _show(self) -> None:
        now = time.monotonic()
        if self.bar:
            # the bar is drawn ten times a second: updating it per request would cost more than the request
            if now - self.last_line >= self.BAR_EVERY_S or self.done >= self.total:
                self.last_line = now
                self.bar.update(self.task, completed=self.done, info=self.status(now))
        elif now - self.last_line >= self.LINE_EVERY_S:
            self.last_line = now
            rate = self.done / max(1e-6, now - self.started)
            left = self.total - self.done
            eta = f" · ETA {left / rate:,.0f} s" if rate and left > 0 else ""
            err.print(f"{self.label}: {self.done}/{self.total} · {self.status(now)}{eta}", highlight=False)


def note_unknown_context(summary: JobSummary, models: dict[str, catalog.ModelInfo]) -> None:
    for model in sorted(summary.per_model):
        info = models.get(model)
        if info is not None and info.context_window is None:
            err.print(
                f"note: {printable(model)} has no context window in the price file: "
                "its prompts were not checked against one",
                markup=False,
                highlight=False,
            )


# ---- runs, export, report ------------------------------------------------------------------


def print_report(ledger: Ledger, run_id: str, parquet: Path | None = None) -> None:
    """The per-model table and the top errors: from the run's Parquet when there is one (streamed),
    else from the ledger."""
    if parquet is not None:
        models, errors = summarize(pl.scan_parquet(parquet).select(REPORT_NEEDS))
    else:
        frame = run_frame(ledger, run_id, REPORT_NEEDS)
        models, errors = summarize(frame.lazy()) if not frame.is_empty() else (frame, frame)
    table = Table(title="report", title_justify="left")
    for column in REPORT_COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for row in models.iter_rows(named=True):
        table.add_row(*cells(row))
    out.print(table)
    for row in errors.iter_rows(named=True):
        out.print(
            f"  {row['count']} × {row['error_type']}: {row['example']}",
            markup=False,
            highlight=False,
        )
