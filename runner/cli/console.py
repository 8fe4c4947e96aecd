"""What the command line shows: tables, the progress line, the report. With runner/cli.py the only
code that prints; both speak through rich."""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio
import polars as pl
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from runner.app.quote import Estimate
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
from runner.core.jobs import JobSummary
from runner.core.money import format_usd
from runner.ledger import BudgetView, Ledger, RunView

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
    for column in ("model", "requests", "quoted", "expected", "kind"):
        table.add_column(column, justify="left" if column in ("model", "kind") else "right", no_wrap=True)
    for model, q in sorted(estimate.per_model.items()):
        kind = "exact" if q.exact else "upper bound"
        if q.tokenized:  # the prompt counted by the server's own tokenizer, the answer at its bound
            kind += (
                " (prompt counted by the server"
                + ("" if q.tokenized == q.requests else f" for {q.tokenized}")
                + ")"
            )
        elif not q.exact:
            kind += " (prompt by its bytes)"
        quoted = format_usd(q.nanos, places=6)
        if q.unknown:  # an unknown price is never shown as $0: what is known, and how much is not
            kind = f"unknown for {q.unknown}" + ("" if q.unknown == q.requests else f", {kind} for the rest")
            quoted = "unknown" if q.unknown == q.requests else f"{quoted} + unknown"
        expected = format_usd(q.expected_nanos, places=6) if q.unknown < q.requests else "unknown"
        table.add_row(printable(model), f"{q.requests:,}", quoted, expected, kind)
    total = format_usd(estimate.total_nanos, places=6)
    table.add_row(
        "[b]total[/b]",
        "",
        f"[b]{total + ' + unknown' if estimate.unquoted_count else total}[/b]",
        f"[b]{format_usd(estimate.expected_nanos, places=6)}[/b]",
        "exact" if estimate.exact else "upper bound",
    )
    if estimate.reused:  # answered from the ledger: not sent, not held
        saved = format_usd(estimate.saved_nanos, places=6)
        table.add_row("from the cache", f"{estimate.reused:,}", f"{saved} saved", "", "not sent")
    if remaining is not None:
        table.add_row("budget remaining", "", format_usd(remaining, places=6), "", "")
    guessed = estimate.expect.guessed(estimate.per_model) if estimate.expect is not None else []
    if guessed:  # said, not hidden: no answer of these models in the ledger yet
        shown = ", ".join(printable(m) for m in guessed[:3]) + (" ..." if len(guessed) > 3 else "")
        table.caption = (
            f"expected: answers at half their bound for {shown} (no earlier answer in this ledger)"
        )
    return table


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
    modes = ledger.by_mode(run_id)
    if any(mode == "batch" for mode, *_ in modes):
        for mode, answers, charged, as_calls in modes:
            note = (
                f", {format_usd(as_calls - charged, places=6)} saved against call prices"
                if mode == "batch"
                else ""
            )
            console.print(
                f"{mode}: {answers:,} answer(s), {format_usd(charged, places=6)}{note}",
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


def text_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    """A table of text cells, the first column left-aligned (no markup read from the cells)."""
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table
