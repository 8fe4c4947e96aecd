"""What the command line shows: tables, the progress line, the report. With runner/cli.py the only
code that prints; both speak through rich."""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio
import polars as pl
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

from runner.app.quote import Estimate
from runner.app.reconcile import BudgetReconciliation, Reconciliation
from runner.app.report import COLUMNS as REPORT_COLUMNS
from runner.app.report import REPORT_NEEDS, cells, run_frame, summarize
from runner.core import catalog
from runner.core.errors import (
    BudgetExceeded,
    ConfigError,
    JobError,
    LedgerUnavailable,
    ProviderError,
    RunnerError,
    Unpriced,
    printable,
)
from runner.core.events import Event, Funds, Notice, Phase, Quoted, RequestFinished
from runner.core.jobs import JobSummary
from runner.core.money import format_usd, from_nanos
from runner.ledger import BudgetView, Ledger, RunView, WorkerView

ERRORS_SHOWN = 20
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_OVER_BUDGET = 3
EXIT_RUN_STOPPED = 4
EXIT_REQUESTS_FAILED = 5  # the run finished, but some requests failed or are possibly billed
EXIT_BOOKS_DIFFER = 6  # reconcile: the ledger and the provider's books do not agree
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT

P = ParamSpec("P")
R = TypeVar("R")


# Python's cycle collector looks at its youngest objects after every 700 new ones by default. With
# thousands of calls in flight, each making dozens of short-lived objects, that is a collection every
# few requests, and a fifth of the command's CPU (benchmarks/latency.py, 20,000 calls at 2,000 in
# flight: 12.8 s of CPU with the default, 9.6 s with 10,000). At 10,000 a collection still came every
# ~100 requests and walked the objects of the calls in flight (0.6 s of the openai path's 7 s, 1.7 s
# of the Run API's 11 s); at 50,000 those are 0.05 s and 0.65 s (`runner run` CPU 6.8-7.1 s -> 6.3-6.5 s
# with `benchmarks/latency.py --provider openai`; the 1M-line peak RSS 226 -> 222 MB). The older
# generations keep their defaults, so cyclic garbage (a few hundred objects a run) is still reclaimed.
GC_YOUNGEST = 50_000


def tune_collector() -> None:
    """The command's setting of the cycle collector (the library leaves the interpreter alone)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNGEST, older, oldest)


def run_async(main: Callable[[], Awaitable[R]]) -> R:
    """The one place the CLI starts an event loop: anyio on asyncio's standard loop (uvloop measured
    no faster here: benchmarks/run.py, `runner run` 4,315 vs 4,627 req/s sustained)."""
    return anyio.run(main)


def friendly(func: Callable[P, R]) -> Callable[P, R]:
    """Turn runner's own errors into a message and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except JobError as exc:
            for issue in exc.issues[:ERRORS_SHOWN]:
                err.print(str(issue), markup=False, highlight=False)
            if exc.total > ERRORS_SHOWN:
                err.print(f"… and {exc.total - ERRORS_SHOWN} more", highlight=False)
            raise typer.Exit(EXIT_INVALID) from None
        except RunnerError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(exit_code_for(exc)) from None
        except KeyboardInterrupt:  # before the run phase, which handles Ctrl-C itself
            err.print("interrupted; the ledger is consistent: run the same command again to continue")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def exit_code_for(exc: RunnerError) -> int:
    if isinstance(exc, BudgetExceeded | Unpriced):
        return EXIT_OVER_BUDGET
    if isinstance(exc, ProviderError | LedgerUnavailable):
        return EXIT_RUN_STOPPED
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    return EXIT_INVALID


class QuietConsole(Console):
    """A console that goes quiet when its reader has gone (`runner run … | tee log` and Ctrl-C, or
    `| head`): rich would end the program there, before the run drains and writes its Parquet."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.file.fileno())  # later writes, and the flush at exit, go nowhere
        os.close(devnull)


# a log or a pipe gets every figure: no width to cut lines or table cells to
out = QuietConsole(width=None if sys.stdout.isatty() else 10_000)
err = QuietConsole(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 10_000)


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
        quoted = format_usd(q.nanos, places=6)
        if q.unknown:  # an unknown price is never shown as $0: what is known, and how much is not
            kind = f"unknown for {q.unknown}" + ("" if q.unknown == q.requests else f", {kind} for the rest")
            quoted = "unknown" if q.unknown == q.requests else f"{quoted} + unknown"
        table.add_row(printable(model), f"{q.requests:,}", quoted, kind)
    total = format_usd(estimate.total_nanos, places=6)
    table.add_row(
        "[b]total[/b]",
        "",
        f"[b]{total + ' + unknown' if estimate.unquoted_count else total}[/b]",
        "exact" if estimate.exact else "upper bound",
    )
    if estimate.reused:  # answered from the ledger: not sent, not held
        saved = format_usd(estimate.saved_nanos, places=6)
        table.add_row("from the cache", f"{estimate.reused:,}", f"{saved} saved", "not sent")
    if remaining is not None:
        table.add_row("budget remaining", "", format_usd(remaining, places=6), "")
    return table


class Progress:
    """Rich progress on a terminal; a plain line every few seconds otherwise (logs, CI, pipes)."""

    LINE_EVERY_S = 5.0
    BAR_EVERY_S = 0.1

    NARROW = 110  # below this many columns the line keeps the essentials: done/total, failed, $, ETA
    RATE_WINDOW_S = 60.0  # rate and ETA over the last minute, not the whole run's average

    def __init__(self, label: str, total: int, console: Console | None = None) -> None:
        self.console = console or err
        self.bar: RichProgress | None = None
        self.narrow = self.console.width < self.NARROW
        self.samples: deque[tuple[float, int]] = deque()
        if self.console.is_terminal:
            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=10 if self.narrow else 30),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.bar.add_task(label, total=total, info="")
        self.funds: Funds | None = None
        self._begin(label, total)

    def _begin(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.done = self.failed = self.spent = 0
        self.started = time.monotonic()
        self.samples.clear()
        self.samples.append((self.started, 0))
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
            self.console.print(event.message, markup=False, highlight=False)
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

    def _sample(self, now: float) -> None:
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.RATE_WINDOW_S:
            self.samples.popleft()  # one sample older than the window stays: the window's start

    def rate(self, now: float) -> float:
        """Requests a second over the last RATE_WINDOW_S (the run's average until then)."""
        then, done_then = self.samples[0] if self.samples else (self.started, 0)
        return (self.done - done_then) / max(1e-6, now - then)

    def status(self, now: float) -> str:
        elapsed = max(1e-6, now - self.started)
        rate = self.rate(now)
        parts = [f"{self.failed} failed"]
        stalled = self.funds.stalled if self.funds is not None else 0
        if stalled:
            parts.append(f"{stalled} stalled")
        if self.label == "running":
            parts.append(f"{format_usd(self.spent)} spent")
        if self.narrow:
            return " · ".join(parts)
        parts.insert(1, f"{rate:,.0f}/s")
        if self.label == "running":
            per_minute = self.spent * 60_000 // max(1, round(elapsed * 1000))  # integer nano-USD
            parts.append(f"{format_usd(per_minute)}/min")
            if self.funds is not None:
                parts.append(f"{format_usd(self.funds.reserved_nanos)} reserved")
                parts.append(f"{format_usd(self.funds.remaining_nanos)} left in the budget")
        return " · ".join(parts)

    def _show(self) -> None:
        now = time.monotonic()
        if now - self.samples[-1][0] >= 1.0:
            self._sample(now)
        if self.bar:
            # the bar is drawn ten times a second: updating it per request would cost more than the request
            if now - self.last_line >= self.BAR_EVERY_S or self.done >= self.total:
                self.last_line = now
                self.bar.update(self.task, completed=self.done, info=self.status(now))
        elif now - self.last_line >= self.LINE_EVERY_S:
            self.last_line = now
            status = self.status(now)
            rate, left = self.rate(now), self.total - self.done
            eta = f" · ETA {left / rate:,.0f} s" if rate and left > 0 else ""
            self.console.print(f"{self.label}: {self.done}/{self.total} · {status}{eta}", highlight=False)


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


REPORT_TABLE_WIDTH = 150  # narrower than this, the report is a block of lines per model


def print_report(
    ledger: Ledger, run_id: str, parquet: Path | None = None, console: Console | None = None
) -> None:
    """The per-model table and the top errors: from the run's Parquet when there is one (streamed),
    else from the ledger. On a narrow terminal, one block per model, no figure cut."""
    console = console or out
    if parquet is not None:
        models, errors = summarize(pl.scan_parquet(parquet).select(REPORT_NEEDS))
    else:
        frame = run_frame(ledger, run_id, REPORT_NEEDS)
        models, errors = summarize(frame.lazy()) if not frame.is_empty() else (frame, frame)
    if console.width < REPORT_TABLE_WIDTH:
        console.print("report", highlight=False)
        for row in models.iter_rows(named=True):
            console.print(report_block(cells(row)), markup=False, highlight=False)
    else:
        table = Table(title="report", title_justify="left")
        for column in REPORT_COLUMNS:
            table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
        for row in models.iter_rows(named=True):
            table.add_row(*cells(row))
        console.print(table)
    for row in errors.iter_rows(named=True):
        console.print(
            f"  {row['count']} × {row['error_type']}: {printable(str(row['example']))}",
            markup=False,
            highlight=False,
        )
    reused, saved = ledger.reused(run_id)
    if reused:
        console.print(
            f"{reused:,} request(s) answered from the cache, not sent: "
            f"{format_usd(saved, places=6)} saved (--cache refresh buys them again)",
            highlight=False,
        )


def report_block(texts: list[str]) -> str:
    """One model's report as short lines (each under 80 columns for any figure it can hold)."""
    f = dict(zip(REPORT_COLUMNS, texts, strict=True))
    lines = [
        printable(f["model"]),
        f"  ok {f['ok']} · failed {f['failed']} · possibly billed {f['possibly billed']}",
        f"  tokens: prompt {f['prompt tok']} · output {f['output tok']} · reasoning {f['reasoning tok']}",
        f"  quoted {f['quoted']} · charged {f['charged']} · drift {f['drift']}",
        f"  latency p50 {f['p50 s']} s · p95 {f['p95 s']} s · {f['$/1k out']} per 1k out",
    ]
    return "\n".join(lines)


def print_catalog(*, as_json: bool) -> None:
    """The model catalog: context windows, reasoning support, prices per 1M tokens."""
    rows = list(catalog.MODELS.values())

    def per_million(price: Any) -> str:
        return "unknown" if price is None else format_usd(price * catalog.PER_MILLION, places=2)

    if as_json:
        data = [
            {
                "model": m.slug,
                "context_window": m.context_window,
                "reasoning_effort": m.reasoning_effort,
                "always_reasons": m.always_reasons,
                "input_per_million": per_million(m.input_price),
                "output_per_million": per_million(m.output_price),
            }
            for m in rows
        ]
        out.print(json.dumps(data, indent=2), markup=False, highlight=False)
        return
    table = Table(title="models")
    for column in ("model", "context", "reasoning", "input / 1M", "output / 1M"):
        table.add_column(column)
    for m in rows:
        reasoning = "always" if m.always_reasons else ("effort" if m.reasoning_effort else "-")
        context = "unknown" if m.context_window is None else f"{m.context_window:,}"
        table.add_row(m.slug, context, reasoning, per_million(m.input_price), per_million(m.output_price))
    out.print(table)


def runs_table(runs: list[RunView]) -> Table:
    table = Table(title="runs", title_justify="left")
    for column in ("run", "job", "state", "ok", "failed", "possibly billed", "total", "spent"):
        table.add_column(column, no_wrap=column != "job")
    for r in runs:
        states = r.states
        table.add_row(
            r.id,
            Path(r.job_path).name,
            r.state,
            str(states.get("ok", 0)),
            str(states.get("failed", 0)),
            str(states.get("possibly_billed", 0)),
            str(r.total),
            format_usd(r.spent_nanos, places=6),
        )
    return table


# ---- --json: documents for scripts, money as decimal strings ----------------------------------


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
        "exact": estimate.exact,
        "unquoted": estimate.unquoted_count,
        "quote_calls": estimate.quote_calls,
        "from_cache": estimate.reused,
        "saved_usd": usd(estimate.saved_nanos),
        "per_model": {
            model: {
                "requests": q.requests,
                "quoted_usd": usd(q.nanos),
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


def text_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    """A table of text cells, the first column left-aligned (no markup read from the cells)."""
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table
