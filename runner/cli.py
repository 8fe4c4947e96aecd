"""The `runner` command line: thin wrappers over the library; the only module that prints."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from runner import catalog
from runner.errors import BudgetExceeded, ConfigError, JobError, ProviderError, RunnerError
from runner.jobs import JobSummary, validate_job
from runner.money import format_usd

app = typer.Typer(
    help="Cost-aware batch runner for LLM chat requests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)

EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_OVER_BUDGET = 3
EXIT_RUN_STOPPED = 4
ERRORS_SHOWN = 20

P = ParamSpec("P")
R = TypeVar("R")


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

    return wrapper


def exit_code_for(exc: RunnerError) -> int:
    if isinstance(exc, BudgetExceeded):
        return EXIT_OVER_BUDGET
    if isinstance(exc, ProviderError):
        return EXIT_RUN_STOPPED
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    return EXIT_INVALID


def _summary_json(summary: JobSummary) -> dict[str, Any]:
    return {
        "file": summary.file,
        "ok": summary.ok,
        "requests": summary.requests,
        "per_model": dict(sorted(summary.per_model.items())),
        "error_count": summary.issue_count,
        "errors": [
            {"file": i.file, "line": i.line, "field": i.field, "message": i.message}
            for i in summary.issues
        ],
    }


def _print_summary(summary: JobSummary) -> None:
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


@app.command()
@friendly
def validate(
    jobs: Annotated[list[Path], typer.Argument(help="Job files (JSONL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON document.")] = False,
) -> None:
    """Check every line of the job files against the provider's contract; spends nothing."""
    summaries = [validate_job(path) for path in jobs]
    if as_json:
        out.print_json(data={"jobs": [_summary_json(s) for s in summaries]})
    else:
        for summary in summaries:
            _print_summary(summary)
    if not all(s.ok for s in summaries):
        raise typer.Exit(EXIT_INVALID)


@app.command()
@friendly
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON document.")] = False,
) -> None:
    """List the model catalog: context windows, reasoning support and prices per 1M tokens."""
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
        table.add_row(
            m.slug,
            f"{m.context_window:,}",
            reasoning,
            per_million(m.input_price),
            per_million(m.output_price),
        )
    out.print(table)


def main() -> None:
    app()
