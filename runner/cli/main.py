"""The `runner` command line: thin wrappers over the library; the only module that prints."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import anyio
import polars as pl
import typer
from rich.table import Table

from runner.app.export import export_jsonl, export_parquet
from runner.app.quote import Estimate, fits, quote_requests
from runner.app.reconcile import BudgetReconciliation, Reconciliation, reconcile_run
from runner.app.report import REPORT_NEEDS, run_frame
from runner.app.run import RunResult, run_job
from runner.app.sweep import load_spec
from runner.app.sweep_run import (
    SweepResult,
    cell_report,
    check_budget,
    plan_sweep,
    rows_that_fit,
    run_sweep,
    sweep_of_run,
)
from runner.cli import html_report, sweep_view
from runner.cli.console import (
    ERRORS_SHOWN,
    EXIT_BOOKS_DIFFER,
    EXIT_INVALID,
    EXIT_OVER_BUDGET,
    EXIT_REQUESTS_FAILED,
    EXIT_RUN_STOPPED,
    Progress,
    budget_json,
    budget_reconciliation_json,
    budget_table,
    err,
    estimate_json,
    estimate_table,
    friendly,
    note_unknown_context,
    out,
    print_budget_reconciliation,
    print_catalog,
    print_json,
    print_reconciliation,
    print_report,
    print_summary,
    reconciliation_json,
    report_json,
    run_async,
    run_json,
    runs_table,
    summary_json,
    text_table,
    tune_collector,
    usd,
    worker_json,
    workers_table,
)
from runner.core import catalog
from runner.core.errors import ConfigError, RunBusy, printable
from runner.core.jobs import MAX_LINE_BYTES, iter_requests, validate_job
from runner.core.money import format_usd, parse_usd, to_nanos
from runner.engine.engine import RunOptions, parse_deadline
from runner.ledger import Ledger, RunView
from runner.ledger.workers import join_run, leave_run, worker_name, workers
from runner.providers import http
from runner.providers.orthogonal import OrthogonalProvider
from runner.providers.registry import ProviderSettings, connect, price_table, provider_of_scope

# `runner simulator` is realistic unless told otherwise: calls of a second or two, dry runs a round trip
SIMULATED_LATENCY = "0.5-2"
SIMULATED_DRY_RUN_LATENCY = "0.05-0.2"

app = typer.Typer(
    help="Cost-aware batch runner for LLM chat requests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
@friendly
def validate(
    jobs: Annotated[list[Path], typer.Argument(help="Job files (JSONL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON document.")] = False,
    max_line_bytes: MaxLineOpt = MAX_LINE_BYTES,
) -> None:
    """Check every line of the job files against the provider's contract; spends nothing."""
    summaries = [validate_job(path, None, _max_line(max_line_bytes)) for path in jobs]
    if as_json:
        out.print_json(data={"jobs": [summary_json(s) for s in summaries]})
    else:
        for summary in summaries:
            print_summary(summary)
    if not all(s.ok for s in summaries):
        raise typer.Exit(EXIT_INVALID)


@app.command()
@friendly
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON document.")] = False,
    provider: Annotated[
        str | None, typer.Option("--provider", help="Ask this provider for its live list (free).")
    ] = None,
    base_url: Annotated[str | None, typer.Option("--base-url", help="The provider's base URL.")] = None,
) -> None:
    """List the model catalog: context windows, reasoning support and prices per 1M tokens."""
    if provider is not None:
        settings = _settings(provider, base_url, None, "tokens")

        async def live() -> list[str]:
            async with connect(settings) as conn:
                return await conn.provider.models()

        slugs = run_async(live)
        if as_json:
            out.print(json.dumps(slugs, indent=2), markup=False, highlight=False)
        else:
            for slug in slugs:
                known = "" if slug in catalog.MODELS else "  (not in runner's catalog)"
                out.print(f"{slug}{known}", markup=False, highlight=False)
        return
    print_catalog(as_json=as_json)


# ---- shared options ------------------------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document (money as decimal strings).")]
ConcurrencyOpt = Annotated[int, typer.Option(help="Requests in flight at most.")]
RpmOpt = Annotated[float | None, typer.Option(help="Requests per minute at most.")]
TpmOpt = Annotated[float | None, typer.Option(help="Tokens per minute at most.")]
DeadlineOpt = Annotated[
    str | None,
    typer.Option("--deadline", help="Stop launching then (2h30m, 06:30, or a date and time); drain."),
]
MaxUsdPerHourOpt = Annotated[
    str | None, typer.Option("--max-usd-per-hour", help="Spend (held quotes) per hour at most.")
]
RetryPossiblyBilledOpt = Annotated[
    bool, typer.Option("--retry-possibly-billed", help="Re-send requests whose outcome is unknown.")
]
RetryFailedOpt = Annotated[bool, typer.Option("--retry-failed", help="Send the run's failed requests again.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Parquet path.")]
CacheOpt = Annotated[
    str,
    typer.Option(
        "--cache",
        help="reuse: answers kept in the ledger are not bought again; refresh: buy them again; "
        "off: send every line as written.",
    ),
]
MaxLineOpt = Annotated[
    int, typer.Option("--max-line-bytes", help="The longest job line read (16 MiB by default).")
]


def _max_line(value: int) -> int:
    if value < 1:
        msg = f"--max-line-bytes must be 1 or more (got {value})"
        raise ConfigError(msg)
    return value


ProviderOpt = Annotated[
    str, typer.Option("--provider", help="orthogonal | openai | simulator (in-process, offline).")
]
BaseUrlOpt = Annotated[str | None, typer.Option("--base-url", help="The provider's base URL.")]
DbOpt = Annotated[
    str | None, typer.Option("--db", help="Ledger location (sqlite:///PATH); default RUNNER_DB.")
]
PriceFileOpt = Annotated[
    Path | None, typer.Option("--price-file", help="TOML/JSON prices per 1M tokens (openai).")
]
SimPricingOpt = Annotated[str, typer.Option("--sim-pricing", help="Simulator: tokens | flat.")]


TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", help="Seconds a reply may stay silent (a long reasoning call is quiet)."),
]
ConnectTimeoutOpt = Annotated[
    float, typer.Option("--connect-timeout", help="Seconds to connect (TCP and TLS).")
]


def _timeouts(read_s: float, connect_s: float) -> http.Timeouts:
    for name, value in (("--timeout", read_s), ("--connect-timeout", connect_s)):
        if not value > 0:  # NaN is not > 0 either
            msg = f"{name} must be above 0 seconds (got {value:g})"
            raise ConfigError(msg)
    return http.Timeouts(connect_s=connect_s, read_s=read_s)


def _settings(
    provider: str,
    base_url: str | None,
    price_file: Path | None,
    sim_pricing: str,
    concurrency: int = 64,
    timeouts: http.Timeouts = http.Timeouts(),
) -> ProviderSettings:
    return ProviderSettings(
        name=provider,
        base_url=base_url,
        price_file=price_file,
        sim_pricing=sim_pricing,
        max_connections=concurrency,
        timeouts=timeouts,
    )


def _usd_arg(text: str, what: str) -> Decimal:
    try:
        return parse_usd(text)
    except ValueError:
        msg = f"{what}: '{text}' is not an amount in USD (e.g. 25.00)"
        raise ConfigError(msg) from None


# ---- budgets -------------------------------------------------------------------------------

budget_app = typer.Typer(help="Budgets kept in the ledger: a hard stop on spending.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")


@budget_app.command("create")
@friendly
def budget_create(
    name: str,
    limit: Annotated[str, typer.Option("--limit", help="USD, e.g. 25.00")],
    db: DbOpt = None,
) -> None:
    """Create a budget with a spending limit."""
    view = Ledger(db).create_budget(name, to_nanos(_usd_arg(limit, "--limit")))
    out.print(budget_table([view], "budget created"))


@budget_app.command("list")
@friendly
def budget_list(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List the budgets."""
    views = Ledger(db).budgets()
    if as_json:
        print_json([budget_json(v) for v in views])
        return
    out.print(budget_table(views, "budgets"))


@budget_app.command("show")
@friendly
def budget_show(name: str, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Limit, spent, reserved, possibly billed and remaining money of one budget."""
    view = Ledger(db).budget(name)
    if as_json:
        print_json(budget_json(view))
        return
    out.print(budget_table([view], f"budget {name}"))


@budget_app.command("raise")
@friendly
def budget_raise(
    name: str,
    to: Annotated[str | None, typer.Option("--to", help="The new limit in USD.")] = None,
    by: Annotated[str | None, typer.Option("--by", help="USD to add to the limit.")] = None,
    db: DbOpt = None,
) -> None:
    """Change a budget's limit (never below what is already spent and reserved)."""
    if (to is None) == (by is None):
        msg = "give exactly one of --to or --by"
        raise ConfigError(msg)
    ledger = Ledger(db)
    current = ledger.budget(name)
    limit = (
        to_nanos(_usd_arg(to, "--to"))
        if to is not None
        else current.limit_nanos + to_nanos(_usd_arg(by or "0", "--by"))
    )
    out.print(budget_table([ledger.set_limit(name, limit)], f"budget {name}"))


@budget_app.command("history")
@friendly
def budget_history(name: str, db: DbOpt = None, limit: int = 50, as_json: JsonOpt = False) -> None:
    """A budget's ledger entries, newest first."""
    if as_json:
        entries = Ledger(db).history(name, limit)
        keys = ("kind", "run_id", "request_id")
        print_json(
            [
                {**{k: e[k] for k in keys}, "at": e["at"].isoformat(), "amount_usd": usd(e["amount_nanos"])}
                for e in entries
            ]
        )
        return
    table = Table(title=f"history of {name}", title_justify="left")
    for column in ("when (UTC)", "entry", "amount", "run", "request"):
        table.add_column(column, no_wrap=True)
    for e in Ledger(db).history(name, limit):
        table.add_row(
            e["at"].strftime("%Y-%m-%d %H:%M:%S"),
            e["kind"],
            format_usd(e["amount_nanos"], places=9),
            e["run_id"] or "",
            str(e["request_id"] or ""),
        )
    out.print(table)


# ---- estimate and run ----------------------------------------------------------------------


@app.command()
@friendly
def estimate(
    job: Path,
    provider: ProviderOpt = "orthogonal",
    base_url: BaseUrlOpt = None,
    budget: Annotated[str | None, typer.Option("--budget", help="Compare with this budget.")] = None,
    price_file: PriceFileOpt = None,
    sim_pricing: SimPricingOpt = "tokens",
    concurrency: int = 32,
    timeout: TimeoutOpt = http.READ_TIMEOUT_S,
    connect_timeout: ConnectTimeoutOpt = http.CONNECT_TIMEOUT_S,
    max_line_bytes: MaxLineOpt = MAX_LINE_BYTES,
    cache: CacheOpt = "reuse",
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate, then quote every request (dry runs, cached in the ledger); exit 3 if over budget."""
    settings = _settings(
        provider, base_url, price_file, sim_pricing, concurrency, _timeouts(timeout, connect_timeout)
    )
    summary = validate_job(job, price_table(settings), _max_line(max_line_bytes))
    summary.raise_for_issues()
    ledger = Ledger(db)
    remaining = ledger.budget(budget).remaining_nanos if budget else None

    async def work() -> Estimate:
        async with connect(settings) as conn:
            with Progress("quoting", summary.requests) as progress:
                return await quote_requests(
                    iter_requests(job, price_table(settings), max_line=max_line_bytes),
                    provider=conn.provider,
                    scope=conn.scope,
                    ledger=ledger,
                    concurrency=concurrency,
                    on_event=progress,
                    cache=cache,
                )

    result = run_async(work)
    if as_json:
        print_json(estimate_json(result, remaining))
    else:
        out.print(estimate_table(result, remaining))
        out.print(f"quote calls made: {result.quote_calls}", highlight=False)
    for custom_id, reason in result.unquoted[:ERRORS_SHOWN]:
        err.print(f"not quoted: {printable(custom_id)}: {reason}", markup=False, highlight=False)
    if result.unquoted_count:  # as `run` refuses them: they cannot be held against a budget
        err.print(
            f"{result.unquoted_count} request(s) could not be priced: `runner run` would refuse them "
            "(or run the rest with --partial)",
            highlight=False,
        )
        raise typer.Exit(EXIT_OVER_BUDGET)
    if remaining is not None:
        fit, shortfall = fits(result, remaining)
        if not fit:
            err.print(f"over budget '{budget}' by {format_usd(shortfall)}", highlight=False)
            raise typer.Exit(EXIT_OVER_BUDGET)


@app.command()
@friendly
def run(
    job: Path,
    budget: Annotated[str | None, typer.Option("--budget", help="The budget to spend from.")] = None,
    max_usd: Annotated[str | None, typer.Option("--max-usd", help="A cap of this run's own.")] = None,
    provider: ProviderOpt = "orthogonal",
    base_url: BaseUrlOpt = None,
    price_file: PriceFileOpt = None,
    sim_pricing: SimPricingOpt = "tokens",
    concurrency: ConcurrencyOpt = 64,
    rpm: RpmOpt = None,
    deadline: DeadlineOpt = None,
    max_usd_per_hour: MaxUsdPerHourOpt = None,
    tpm: TpmOpt = None,
    partial: Annotated[bool, typer.Option(help="Run what fits the budget, in file order.")] = False,
    new: Annotated[bool, typer.Option("--new", help="Start a fresh run, do not resume.")] = False,
    retry_possibly_billed: RetryPossiblyBilledOpt = False,
    retry_failed: RetryFailedOpt = False,
    run_id: Annotated[
        str | None, typer.Option("--run", help="Go on with this run of the job (any unfinished one).")
    ] = None,
    cache: CacheOpt = "reuse",
    output: OutputOpt = None,
    timeout: TimeoutOpt = http.READ_TIMEOUT_S,
    connect_timeout: ConnectTimeoutOpt = http.CONNECT_TIMEOUT_S,
    max_line_bytes: MaxLineOpt = MAX_LINE_BYTES,
    db: DbOpt = None,
) -> None:
    """Validate → quote → budget check → run (resuming an unfinished run) → Parquet → report."""
    options = RunOptions(  # checked first: a usage error is named before any work
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        partial=partial,
        new=new,
        retry_possibly_billed=retry_possibly_billed,
        retry_failed=retry_failed,
        run_id=run_id,
        handle_signals=True,
        max_line_bytes=max_line_bytes,
        deadline=parse_deadline(deadline) if deadline is not None else None,
        max_usd_per_hour=_usd_arg(max_usd_per_hour, "--max-usd-per-hour") if max_usd_per_hour else None,
        cache=cache,
    )
    if output is not None:
        _check_writable(output)  # found out now, not after the money is spent
    settings = _settings(
        provider, base_url, price_file, sim_pricing, concurrency, _timeouts(timeout, connect_timeout)
    )
    cap = _usd_arg(max_usd, "--max-usd") if max_usd is not None else None
    ledger, result = _run(job, budget, cap, settings, options, db)
    path = output or Path("results") / f"{job.stem}-{result.run_id}.parquet"
    rows = _export(export_parquet, ledger, result.run_id, path)
    out.print(estimate_table(result.estimate, None))
    print_report(ledger, result.run_id, path)
    out.print(
        f"run {result.run_id}: {result.state}" + (f" ({result.reason})" if result.reason else ""),
        highlight=False,
    )
    out.print(
        f"spent {format_usd(result.spent_nanos, places=6)}; {rows} rows written to {path}",
        highlight=False,
    )
    if not result.last:
        out.print(
            f"this worker's share of run {result.run_id} is done; the run's other workers finish it",
            highlight=False,
        )
    if result.state != "done":
        if result.resumable:
            out.print(
                f"the run is resumable; to go on with it: {resume_command(result.run_id)}", highlight=False
            )
        raise typer.Exit(EXIT_RUN_STOPPED)
    unfinished = {s: result.states.get(s, 0) for s in ("failed", "possibly_billed")}
    if any(unfinished.values()):
        err.print(
            f"run {result.run_id} finished with {unfinished['failed']} failed and "
            f"{unfinished['possibly_billed']} possibly billed request(s) (see the report above)",
            highlight=False,
        )
        raise typer.Exit(EXIT_REQUESTS_FAILED)


@app.command()
@friendly
def resume(
    run_id: Annotated[str, typer.Argument(help="The run (its id or the start of it; see `runner runs`).")],
    concurrency: ConcurrencyOpt = 64,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    deadline: DeadlineOpt = None,
    max_usd_per_hour: MaxUsdPerHourOpt = None,
    retry_possibly_billed: RetryPossiblyBilledOpt = False,
    retry_failed: RetryFailedOpt = False,
    cache: CacheOpt = "reuse",
    price_file: PriceFileOpt = None,
    output: OutputOpt = None,
    timeout: TimeoutOpt = http.READ_TIMEOUT_S,
    connect_timeout: ConnectTimeoutOpt = http.CONNECT_TIMEOUT_S,
    max_line_bytes: MaxLineOpt = MAX_LINE_BYTES,
    db: DbOpt = None,
) -> None:
    """Go on with a run (e.g. one left after a --new): its job, provider and budget come from the
    ledger; the rest as `run` takes it."""
    info = Ledger(db).run(run_id)
    provider, base_url, sim_pricing = provider_of_scope(info.provider)
    run(
        Path(info.job_path),
        budget=None,
        max_usd=None,
        provider=provider,
        base_url=base_url,
        price_file=price_file,
        sim_pricing=sim_pricing,
        concurrency=concurrency,
        rpm=rpm,
        deadline=deadline,
        max_usd_per_hour=max_usd_per_hour,
        tpm=tpm,
        partial=False,
        new=False,
        retry_possibly_billed=retry_possibly_billed,
        retry_failed=retry_failed,
        run_id=info.id,
        cache=cache,
        output=output,
        timeout=timeout,
        connect_timeout=connect_timeout,
        max_line_bytes=max_line_bytes,
        db=db,
    )


def resume_command(run_id: str) -> str:
    """This command line, as the shell would take it, going on with `run_id` (a --new or --run
    given dropped)."""
    words, skip = [], False
    for word in sys.argv[1:]:
        if skip:
            skip = False
        elif word == "--run":
            skip = True
        elif word != "--new" and not word.startswith("--run="):
            words.append(word)
    return shlex.join(["runner", *words, "--run", run_id])


def _run(
    job: Path,
    budget: str | None,
    cap: Decimal | None,
    settings: ProviderSettings,
    options: RunOptions,
    db: str | None,
) -> tuple[Ledger, RunResult]:
    """Validate → quote → budget check → run."""
    models = price_table(settings)
    summary = validate_job(job, models, options.max_line_bytes)
    summary.raise_for_issues()
    print_summary(summary)
    note_unknown_context(summary, models)
    ledger = Ledger(db)

    async def work() -> RunResult:
        async with connect(settings) as conn:
            with Progress("running", summary.requests) as progress:
                return await run_job(
                    job,
                    conn=conn,
                    ledger=ledger,
                    budget=budget,
                    max_usd=cap,
                    options=options,
                    on_event=progress,
                    summary=summary,
                    models=models,
                )

    return ledger, run_async(work)


@app.command()
@friendly
def sweep(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="The sweep's spec (TOML).")],
    budget: Annotated[str | None, typer.Option("--budget", help="The budget to spend from.")] = None,
    max_usd: Annotated[str | None, typer.Option("--max-usd", help="A cap of this sweep's own.")] = None,
    estimate_only: Annotated[
        bool, typer.Option("--estimate", help="Show the cost matrix (from dry runs) and stop.")
    ] = False,
    fit: Annotated[
        bool, typer.Option("--fit", help="Over budget: drop the same dataset rows from every cell.")
    ] = False,
    provider: ProviderOpt = "orthogonal",
    base_url: BaseUrlOpt = None,
    sim_pricing: SimPricingOpt = "tokens",
    concurrency: ConcurrencyOpt = 64,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    deadline: DeadlineOpt = None,
    max_usd_per_hour: MaxUsdPerHourOpt = None,
    output: OutputOpt = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write the comparison as HTML.")] = None,
    cache: CacheOpt = "reuse",
    timeout: TimeoutOpt = http.READ_TIMEOUT_S,
    connect_timeout: ConnectTimeoutOpt = http.CONNECT_TIMEOUT_S,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Expand a sweep (dataset × prompt × models × parameters), price every cell from dry runs, run
    it within the budget, grade the answers and compare the cells."""
    options = RunOptions(
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        handle_signals=True,
        deadline=parse_deadline(deadline) if deadline is not None else None,
        max_usd_per_hour=_usd_arg(max_usd_per_hour, "--max-usd-per-hour") if max_usd_per_hour else None,
        cache=cache,
    )
    spec = load_spec(spec_path)
    path = output or Path("results") / f"{spec_path.stem}.parquet"
    if not estimate_only:
        _check_writable(path)
    settings = _settings(
        provider, base_url, None, sim_pricing, concurrency, _timeouts(timeout, connect_timeout)
    )
    ledger = Ledger(db)
    cap = _usd_arg(max_usd, "--max-usd") if max_usd is not None else None
    if budget is not None:
        remaining: int | None = ledger.budget(budget).remaining_nanos
    elif cap is not None:
        remaining = to_nanos(cap)
    elif estimate_only:
        remaining = None
    else:
        raise ConfigError("give a budget: --budget NAME (see `runner budget create`) or --max-usd USD")

    async def work() -> SweepResult | None:
        async with connect(settings) as conn:
            with Progress("quoting", 0) as progress:
                plan = await plan_sweep(
                    spec, path.parent, conn, ledger, concurrency=concurrency, on_event=progress, cache=cache
                )
            if fit and remaining is not None:
                kept = rows_that_fit(plan, remaining)
                if len(kept) < plan.rows_total:
                    out.print(f"--fit: {len(kept)} of {plan.rows_total} dataset rows fit, in every cell")
                    plan = await plan_sweep(
                        spec, path.parent, conn, ledger, concurrency=concurrency, keep_rows=kept, cache=cache
                    )
            if as_json and estimate_only:
                print_json(sweep_view.matrix_json(plan, remaining))
            elif not as_json:
                rows = sweep_view.matrix_rows(plan, remaining)
                out.print(text_table(f"sweep {spec_path.stem}: cost matrix", sweep_view.MATRIX_COLUMNS, rows))
            if remaining is not None:
                check_budget(plan, remaining)
            if estimate_only:
                return None
            name = (
                budget
                or ledger.create_budget(f"sweep-{uuid.uuid4().hex[:8]}", remaining or 0, ephemeral=True).name
            )
            with Progress("running", plan.expansion.requests) as progress:
                return await run_sweep(plan, conn, ledger, name, options, progress)

    result = run_async(work)
    if result is not None:
        _sweep_outputs(result, spec_path.stem, path, html, as_json)


def _sweep_outputs(result: SweepResult, title: str, path: Path, html: Path | None, as_json: bool) -> None:
    """The sweep's Parquet, its comparison (terminal, --html, --json), and the exit code."""
    spec = result.plan.spec
    result.frame.write_parquet(path)
    cells = cell_report(result.frame, spec)
    columns, rows = sweep_view.report_columns(spec), sweep_view.report_rows(cells, spec)
    if html is not None:
        first = spec.graders[0].name if spec.graders else ""
        html.write_text(html_report.render_sweep(title, cells, columns, rows, first), encoding="utf-8")
    job = result.plan.expansion.job
    if as_json:
        print_json({"parquet": str(path), "job": str(job), "cells": sweep_view.report_json(cells)})
    else:
        out.print(text_table(f"sweep {title}: cells (front: on the cost-score Pareto front)", columns, rows))
        judged = format_usd(result.judge.spent_nanos if result.judge else 0, places=6)
        spent = format_usd(result.run.spent_nanos, places=6)
        out.print(
            f"spent {spent} on the cells and {judged} on the judges; {len(result.frame)} rows written to "
            f"{path}; the job is {job}",
            highlight=False,
        )
    if result.run.state != "done" or (result.judge is not None and result.judge.state != "done"):
        raise typer.Exit(EXIT_RUN_STOPPED)


@app.command()
@friendly
def reconcile(
    run_id: Annotated[
        str | None, typer.Argument(help="The run (its id or the start of it); the newest by default.")
    ] = None,
    budget: Annotated[
        str | None, typer.Option("--budget", help="Every run of this budget, and the budget's total.")
    ] = None,
    timeout: TimeoutOpt = http.READ_TIMEOUT_S,
    connect_timeout: ConnectTimeoutOpt = http.CONNECT_TIMEOUT_S,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare a run (or every run of a budget) with the provider's own books; resolve possibly
    billed requests; exit 6 if they differ."""
    ledger = Ledger(db)
    if budget is not None and run_id is not None:
        raise ConfigError("give a run or --budget, not both")
    if budget is not None:
        view = ledger.budget(budget)
        runs = [r for r in reversed(ledger.runs()) if r.budget_id == view.id]
    else:
        found = ledger.runs()
        if run_id is None and not found:
            raise ConfigError("the ledger has no runs to reconcile")
        runs = [ledger.run(run_id) if run_id is not None else found[0]]
    timeouts = _timeouts(timeout, connect_timeout)
    results = [_reconcile_one(ledger, info, timeouts, alone=budget is None) for info in runs]
    total = BudgetReconciliation(ledger.budget(budget), results) if budget is not None else None
    if as_json:
        print_json(budget_reconciliation_json(total) if total else reconciliation_json(results[0]))
    else:
        for result in results:
            print_reconciliation(result)
        if total is not None:
            print_budget_reconciliation(total)
    if any(r.difference_nanos is not None and not r.ok for r in results) or (total and not total.ok):
        raise typer.Exit(EXIT_BOOKS_DIFFER)


def _reconcile_one(ledger: Ledger, info: RunView, timeouts: http.Timeouts, *, alone: bool) -> Reconciliation:
    """One run against the books of the provider endpoint it ran on. A run on a provider that keeps
    no books runner can read is an error when asked for alone, and a run with no figure in a budget's."""
    name, base_url, sim_pricing = provider_of_scope(info.provider)
    if name != "orthogonal":
        msg = (
            f"run {info.id} ran on {name}, which keeps no books runner can read (a charge list or a "
            "balance): nothing to reconcile with"
        )
        if alone:
            raise ConfigError(msg)
        budget = ledger.budget_by_id(info.budget_id).name
        return Reconciliation(info.id, budget, "none", ledger_nanos=info.spent_nanos, note=msg)
    settings = _settings(name, base_url, None, sim_pricing, 8, timeouts)
    worker = worker_name()
    # not while workers send it; joining alone recovers what a crash left in flight
    if not join_run(ledger, info.id, worker, 0, to_send=False).alone:
        leave_run(ledger, info.id, worker, (0, 0, 0), forget=True)
        msg = f"run {info.id} is being sent by other workers; reconcile it once they have finished"
        raise RunBusy(msg, owner="other workers")

    async def work() -> Reconciliation:
        async with connect(settings) as conn:
            return await reconcile_run(ledger, info.id, conn.provider)

    try:
        return run_async(work)
    finally:
        leave_run(ledger, info.id, worker, (0, 0, 0), forget=True)


@app.command()
@friendly
def balance(
    provider: ProviderOpt = "orthogonal",
    base_url: BaseUrlOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The provider's balance, next to the ledger's budgets."""
    if provider != "orthogonal":
        raise ConfigError(f"{provider} reports no balance runner can read (the Run API does)")
    settings = _settings(provider, base_url, None, "tokens", 8)
    views = Ledger(db).budgets()

    async def work() -> Decimal:
        async with connect(settings) as conn:
            assert isinstance(conn.provider, OrthogonalProvider)  # what connect makes of "orthogonal"
            amount: Decimal = await conn.provider.balance()
            return amount

    amount = to_nanos(run_async(work))
    if as_json:
        print_json({"provider_balance_usd": usd(amount), "budgets": [budget_json(v) for v in views]})
        return
    out.print(f"provider balance: {format_usd(amount, places=6)}", highlight=False)
    out.print(budget_table(views, "budgets in the ledger"))


@app.command()
@friendly
def runs(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List runs: job, state, done/failed/total, spent."""
    found = Ledger(db).runs()
    if as_json:
        print_json([run_json(r) for r in found])
        return
    out.print(runs_table(found))


@app.command()
@friendly
def status(run_id: str, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """One run: its state, request counts and money, and the workers that sent it."""
    ledger = Ledger(db)
    r = ledger.run(run_id)
    crew = workers(ledger, r.id)
    if as_json:
        print_json({**run_json(r), "workers": [worker_json(w) for w in crew]})
        return
    out.print(f"run {r.id} · {r.job_path} · {r.provider}", highlight=False)
    out.print(f"state: {r.state}" + (f" ({r.reason})" if r.reason else ""), highlight=False)
    for state, count in sorted(r.states.items()):
        out.print(f"  {state}: {count}", highlight=False)
    out.print(f"spent: {format_usd(r.spent_nanos, places=9)}", highlight=False)
    if crew:
        out.print(workers_table(crew))


@app.command("export")
@friendly
def export_cmd(
    run_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    fmt: Annotated[str, typer.Option("--format", help="parquet | jsonl (OpenAI Batch output)")] = "parquet",
    db: DbOpt = None,
) -> None:
    """Write a run's results to Parquet, or to the OpenAI Batch output JSONL shape."""
    ledger = Ledger(db)
    run_info = ledger.run(run_id)
    if fmt not in ("parquet", "jsonl"):
        msg = f"--format: '{fmt}' is not parquet or jsonl"
        raise ConfigError(msg)
    path = output or Path("results") / f"{Path(run_info.job_path).stem}-{run_info.id}.{fmt}"
    _check_writable(path)
    writer = export_parquet if fmt == "parquet" else export_jsonl
    rows = _export(writer, ledger, run_info.id, path)
    out.print(f"{rows} rows written to {path}", highlight=False)


def _check_writable(path: Path) -> None:
    """A results path that cannot be written is a usage error, named before anything runs."""
    if path.is_dir():
        msg = f"--output: {path} is a folder; give a file path (e.g. {path / 'results.parquet'})"
        raise ConfigError(msg)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders still missing are made at the export
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        msg = f"--output: {path} cannot be written ({folder} is not a writable folder)"
        raise ConfigError(msg)


def _export(writer: Callable[[Ledger, str, Path], int], ledger: Ledger, run_id: str, path: Path) -> int:
    try:
        return writer(ledger, run_id, path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        msg = (
            f"cannot write {path}: {exc}; the run's results are kept in the ledger "
            f"(`runner export {run_id} -o PATH` writes them)"
        )
        raise ConfigError(msg) from None


@app.command()
@friendly
def report(
    run_id: str,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained page.")] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per model: requests, tokens, quoted and charged USD, drift, latency, cost per 1k output; for a
    sweep's run, the per-cell comparison too."""
    ledger = Ledger(db)
    run = ledger.run(run_id)
    swept = sweep_of_run(ledger, run.id)
    cells = cell_report(swept[1], swept[0]) if swept else None
    if as_json:
        document = report_json(ledger, run)
        if cells is not None:
            document["cells"] = sweep_view.report_json(cells)
        print_json(document)
    else:
        print_report(ledger, run.id)
        if swept and cells is not None:
            columns, rows = sweep_view.report_columns(swept[0]), sweep_view.report_rows(cells, swept[0])
            out.print(text_table(f"sweep {swept[0].path.stem}: cells", columns, rows))
    if html is not None:
        try:
            html.parent.mkdir(parents=True, exist_ok=True)
            page = html_report.render(run, run_frame(ledger, run.id, REPORT_NEEDS))
            if swept and cells is not None:  # a sweep's run: the cells' comparison
                spec = swept[0]
                columns, rows = sweep_view.report_columns(spec), sweep_view.report_rows(cells, spec)
                first = spec.graders[0].name if spec.graders else ""
                page = html_report.render_sweep(spec.path.stem, cells, columns, rows, first)
            html.write_text(page, encoding="utf-8")
        except OSError as exc:
            msg = f"{html}: cannot write the report: {exc.strerror}"
            raise ConfigError(msg) from None
        out.print(f"HTML report written to {html}", highlight=False)


# ---- simulator -----------------------------------------------------------------------------


@app.command()
@friendly
def simulator(
    host: str = "127.0.0.1",
    port: int = 8787,
    latency: Annotated[
        str, typer.Option(help="A call's seconds: 0.2, 0.1-0.3 (uniform) or exp:0.2.")
    ] = SIMULATED_LATENCY,
    dry_run_latency: Annotated[
        str, typer.Option("--dry-run-latency", help="A dry run's seconds (a round trip, as a real API's).")
    ] = SIMULATED_DRY_RUN_LATENCY,
    balance: Annotated[str, typer.Option(help="Starting balance in USD.")] = "100",
    pricing: Annotated[str, typer.Option(help="tokens | flat ($0.01 a call).")] = "tokens",
    fault_rate: Annotated[float, typer.Option(help="Share of calls that fail (0..1).")] = 0.0,
    api_key: Annotated[str | None, typer.Option(help="Accept only this key (default: any).")] = None,
) -> None:
    """Serve the simulated Run API and OpenAI-compatible API (fake answers, real protocol)."""
    from runner.simulator import Books, parse_latency, serve  # noqa: PLC0415 - only this command serves

    books = Books(
        pricing=pricing,
        latency=parse_latency(latency),
        dry_run_latency=parse_latency(dry_run_latency),
        fault_rate=fault_rate,
        api_key=api_key,
    )
    books.configure({"balance": balance})

    async def serve_forever() -> None:
        async with serve(books, host, port) as url:
            out.print(
                f"simulator listening on {url} (Run API at {url}/v1/run, OpenAI at {url}/v1)",
                highlight=False,
            )
            await anyio.sleep_forever()

    with contextlib.suppress(KeyboardInterrupt):
        run_async(serve_forever)


def main() -> None:
    tune_collector()
    app()
