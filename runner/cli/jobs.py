"""Commands on job files and sweeps: validate, models, estimate, run, resume, sweep. Each maps its
flags onto one RunConfig (runner.core.config) and hands it to the library."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from runner.app import stats
from runner.app.compare import Comparison, cell_report, compare
from runner.app.expect import Expectation
from runner.app.export import export_parquet
from runner.app.modes import choose_mode, quoted_prices, quoting
from runner.app.planning import PowerPlan, earlier_spread, plan_power, rows_for
from runner.app.quote import Estimate, Quoting, fits, quote_requests
from runner.app.run import RunResult, run_job
from runner.app.sweep import Spec, load_spec, with_baseline
from runner.app.sweep_run import SweepPlan, SweepResult, check_budget, plan_sweep, rows_that_fit, run_sweep
from runner.cli import html_report, sweep_view
from runner.cli.app import app, check_writable, export_to
from runner.cli.console import (
    ERRORS_SHOWN,
    EXIT_INVALID,
    EXIT_OVER_BUDGET,
    EXIT_REQUESTS_FAILED,
    EXIT_RUN_STOPPED,
    err,
    estimate_table,
    friendly,
    note_unknown_context,
    out,
    print_catalog,
    print_report,
    print_summary,
    run_async,
    summary_json,
    text_table,
)
from runner.cli.documents import estimate_json, print_json
from runner.cli.options import DbOpt, Flags, JsonOpt, config_options
from runner.cli.progress import Progress
from runner.core import catalog
from runner.core.config import ESTIMATE, RESUME, RUN, SWEEP, VALIDATE, ProviderSettings, RunConfig
from runner.core.errors import ConfigError, printable
from runner.core.jobs import iter_requests, validate_job
from runner.core.money import format_usd, to_nanos
from runner.ledger import Ledger
from runner.providers.prices import price_table
from runner.providers.registry import connect, provider_of_scope


@app.command()
@friendly
@config_options(VALIDATE)
def validate(
    jobs: Annotated[list[Path], typer.Argument(help="Job files (JSONL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON document.")] = False,
    *,
    flags: Flags,
) -> None:
    """Check every line of the job files against the provider's contract; spends nothing."""
    config = RunConfig().with_flags(**flags)
    # a price file names the models an OpenAI-compatible endpoint runs, as `run --price-file` takes them
    models = price_table(replace(config.provider, name="openai")) if config.provider.price_file else None
    summaries = [validate_job(path, models, config.max_line_bytes) for path in jobs]
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
    if provider is None:
        print_catalog(as_json=as_json)
        return
    settings = ProviderSettings(name=provider, base_url=base_url)

    async def live() -> list[str]:
        async with connect(settings) as conn:
            return await conn.provider.models()

    slugs = run_async(live)
    if as_json:
        out.print(json.dumps(slugs, indent=2), markup=False, highlight=False)
        return
    for slug in slugs:
        known = "" if slug in catalog.MODELS else "  (not in runner's catalog)"
        out.print(f"{slug}{known}", markup=False, highlight=False)


@app.command()
@friendly
@config_options(ESTIMATE)
def estimate(
    job: Path,
    budget: Annotated[str | None, typer.Option("--budget", help="Compare with this budget.")] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    *,
    flags: Flags,
) -> None:
    """Validate, then quote every request (dry runs, cached in the ledger); exit 3 if over budget."""
    config = RunConfig.from_flags(job, **flags)
    models = price_table(config.provider)
    summary = validate_job(job, models, config.max_line_bytes)
    summary.raise_for_issues()
    ledger = Ledger(db)
    remaining = ledger.budget(budget).remaining_nanos if budget else None

    async def work() -> Estimate:
        async with connect(config.provider) as conn:
            mode, why = choose_mode(config, conn, summary, None)  # --mode batch: at batch prices
            if why:
                err.print(why, markup=False, highlight=False)
            quoted = quoting(conn, mode)
            expect = Expectation.load(
                ledger, conn.scope, quoted_prices(quoted, models), list(summary.per_model)
            )
            with Progress("quoting", summary.requests) as progress:
                return await quote_requests(
                    iter_requests(job, models, max_line=config.max_line_bytes),
                    quoted,
                    ledger,
                    limits=config.concurrency,
                    quoting=Quoting(config.cache, policy=config.policy, expect=expect),
                    on_event=progress,
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
@config_options(RUN)
def run(job: Path, db: DbOpt = None, *, flags: Flags) -> None:
    """Validate → quote → budget check → run (resuming an unfinished run) → Parquet → report."""
    # checked first: a usage error is named before any work
    _run(replace(RunConfig.from_flags(job, **flags), handle_signals=True), db)


@app.command()
@friendly
@config_options(RESUME)
def resume(
    run_id: Annotated[str, typer.Argument(help="The run (its id or the start of it; see `runner runs`).")],
    db: DbOpt = None,
    *,
    flags: Flags,
) -> None:
    """Go on with a run (e.g. one left after a --new): its job, provider and budget come from the
    ledger; the rest as `run` takes it."""
    info = Ledger(db).run(run_id)
    name, base_url, sim_pricing = provider_of_scope(info.provider)
    provider = ProviderSettings(name=name, base_url=base_url, sim_pricing=sim_pricing)
    made = RunConfig(job=Path(info.job_path), provider=provider, run_id=info.id, handle_signals=True)
    _run(made.with_flags(**flags), db)


def _run(config: RunConfig, db: str | None) -> None:
    """Validate → quote → budget check → run → Parquet → report, and the exit code."""
    if config.output is not None:
        check_writable(config.output)  # found out now, not after the money is spent
    models = price_table(config.provider)
    summary = validate_job(config.job, models, config.max_line_bytes)
    summary.raise_for_issues()
    print_summary(summary)
    note_unknown_context(summary, models)
    ledger = Ledger(db)

    async def work() -> RunResult:
        async with connect(config.provider) as conn:
            with Progress("running", summary.requests) as progress:
                return await run_job(
                    config, conn=conn, ledger=ledger, on_event=progress, summary=summary, models=models
                )

    result = run_async(work)
    path = config.output or Path("results") / f"{config.job.stem}-{result.run_id}.parquet"
    rows = export_to(export_parquet, ledger, result.run_id, path)
    out.print(estimate_table(result.estimate, None))
    print_report(ledger, result.run_id, path)
    _print_outcome(result, path, rows)


def _print_outcome(result: RunResult, path: Path, rows: int) -> None:
    """How the run ended, and the exit code that says it."""
    reason = f" ({result.reason})" if result.reason else ""
    out.print(f"run {result.run_id}: {result.state}{reason}", highlight=False)
    spent = format_usd(result.spent_nanos, places=6)
    out.print(f"spent {spent}; {rows} rows written to {path}", highlight=False)
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


@app.command()
@friendly
@config_options(SWEEP)
def sweep(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="The sweep's spec (TOML).")],
    estimate_only: Annotated[
        bool, typer.Option("--estimate", help="Show the cost matrix (from dry runs) and stop.")
    ] = False,
    fit: Annotated[
        bool, typer.Option("--fit", help="Over budget: drop the same dataset rows from every cell.")
    ] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Also write the comparison as HTML.")] = None,
    plan_only: Annotated[
        bool,
        typer.Option("--plan", help="Print the rows and money each pair needs (with --detect), and stop."),
    ] = False,
    detect: Annotated[
        float | None,
        typer.Option("--detect", help="The difference in score to detect at 80 % power (0.05: 5 points)."),
    ] = None,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="Compare every cell with this one (a cell's name).")
    ] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    *,
    flags: Flags,
) -> None:
    """Expand a sweep (dataset × prompt × models × parameters), price every cell from dry runs, run
    it within the budget, grade the answers and compare the cells."""
    config = replace(RunConfig.from_flags(spec_path, **flags), handle_signals=True)
    spec = load_spec(spec_path, price_table(config.provider))
    if baseline is not None:
        spec = with_baseline(spec, baseline)
    if detect is not None and not 0 < detect < 1:
        raise ConfigError(f"--detect must be a difference in score above 0 and below 1 (got {detect:g})")
    if plan_only and detect is None:
        raise ConfigError("--plan needs --detect: the difference in score to detect (0.05 for 5 points)")
    estimate_only = estimate_only or plan_only
    path = config.output or Path("results") / f"{spec_path.stem}.parquet"
    if not estimate_only:
        check_writable(path)
    ledger = Ledger(db)
    remaining = _money_for(ledger, config, estimate_only)

    ask = _SweepAsk(estimate_only, fit, plan_only, detect, as_json)
    result = run_async(functools.partial(_sweep_work, spec, config, ledger, path, remaining, ask))
    if result is not None:
        _sweep_outputs(result, spec_path.stem, path, html, as_json)


@dataclass(frozen=True)
class _SweepAsk:
    """What `runner sweep` was asked to do besides running."""

    estimate_only: bool
    fit: bool
    plan_only: bool
    detect: float | None
    as_json: bool


async def _sweep_work(
    spec: Spec, config: RunConfig, ledger: Ledger, path: Path, remaining: int | None, ask: _SweepAsk
) -> SweepResult | None:
    """Price the sweep; size it (--detect, --fit); show the matrix; run it unless only asked for a plan."""
    async with connect(config.provider) as conn:
        priced = quoting(conn, "batch") if config.mode == "batch" else conn  # the batch prices it will pay
        with Progress("quoting", 0) as progress:
            plan = await plan_sweep(
                spec, path.parent, priced, ledger, concurrency=config.concurrency, on_event=progress,
                cache=config.cache,
            )  # fmt: skip

        async def replan(rows: set[str]) -> SweepPlan:
            return await plan_sweep(
                spec, path.parent, priced, ledger, concurrency=config.concurrency, keep_rows=rows,
                cache=config.cache,
            )  # fmt: skip

        if ask.detect is not None:
            power = plan_power(plan, ask.detect, earlier_spread(ledger, spec), remaining)
            if ask.plan_only:
                print_json(power.as_json()) if ask.as_json else print_power(power)
                return None
            if ask.fit and power.rows < plan.rows_total:
                out.print(f"--fit --detect: the first {power.rows} of {plan.rows_total} dataset rows")
                plan = await replan(rows_for(plan, power))
        if ask.fit and remaining is not None:
            kept = rows_that_fit(plan, remaining)
            if len(kept) < plan.rows_total:
                out.print(f"--fit: {len(kept)} of {plan.rows_total} dataset rows fit, in every cell")
                plan = await replan(kept)
        _show_matrix(plan, remaining, spec.path.stem, as_json=ask.as_json, estimate_only=ask.estimate_only)
        if ask.estimate_only:
            return None
        with Progress("running", plan.expansion.requests) as progress:
            return await run_sweep(plan, conn, ledger, config, progress)


def _show_matrix(
    plan: SweepPlan, remaining: int | None, title: str, *, as_json: bool, estimate_only: bool
) -> None:
    """The cost matrix (a JSON document for --estimate --json), then the budget checks."""
    if as_json and estimate_only:
        print_json(sweep_view.matrix_json(plan, remaining))
    elif not as_json:
        rows = sweep_view.matrix_rows(plan, remaining)
        out.print(text_table(f"sweep {title}: cost matrix", sweep_view.MATRIX_COLUMNS, rows))
    if remaining is not None:
        check_budget(plan, remaining)


def print_power(power: PowerPlan) -> None:
    """The rows and money each pair needs to detect the difference asked, and what a budget detects."""
    rows = [
        [
            printable(p.a),
            printable(p.b),
            p.grader,
            f"{p.sd:.3f} ({p.sd_from})",
            f"{p.rows:,}",
            format_usd(p.a_nanos, places=6),
            format_usd(p.b_nanos, places=6),
        ]
        for p in power.pairs
    ]
    columns = ["a", "b", "grader", "sd of a - b", "rows needed", "cost in a", "cost in b"]
    title = f"to detect {power.detect * 100:g} points at 80 % power (paired, two-sided, 5 %)"
    out.print(text_table(title, columns, rows))
    if any(p.sd_from == "default" for p in power.pairs):
        out.print(
            f"no earlier run of this spec gives a spread: sd {stats.DEFAULT_SD} taken (pass/fail pairs that "
            "disagree half the time, a conservative figure); run a small sweep first for a closer plan",
            highlight=False,
        )
    more = f" (the dataset has {power.dataset_rows:,})" if power.rows > power.dataset_rows else ""
    out.print(
        f"every cell at {power.rows:,} rows{more}: {format_usd(power.total_nanos, places=6)} in all, "
        "judges included",
        highlight=False,
    )
    if power.budget_rows is not None:
        seen = "–" if power.detectable is None else f"{power.detectable * 100:.1f} points"
        out.print(
            f"the budget buys {power.budget_rows:,} rows of every cell: the smallest difference it "
            f"detects is {seen}",
            highlight=False,
        )


def print_unscored(cells: Any, spec: Spec) -> None:
    """Graded answers a grader gave no score (a judge's text with none in it): counted, never silent."""
    for g in spec.graders:
        column = f"{g.name}_unscored"
        count = int(cells[column].sum()) if column in cells.columns else 0
        if count:
            out.print(
                f"{g.name}: {count} answer(s) got no score (failed grades; `{g.name}_error` and the text "
                f"in `{g.name}_explanation` in the Parquet)",
                highlight=False,
            )


def print_comparisons(compared: list[Comparison]) -> None:
    """The paired comparisons: a table, then each as a sentence."""
    if not compared:
        return
    rows = sweep_view.comparison_rows(compared)
    out.print(
        text_table("paired comparisons (rows both cells answered)", sweep_view.COMPARISON_COLUMNS, rows)
    )
    for c in compared:
        out.print(f"  {printable(c.sentence())}", markup=False, highlight=False)


def _money_for(ledger: Ledger, config: RunConfig, estimate_only: bool) -> int | None:
    """What a sweep may spend (nano-USD): its budget's remaining money, or its --max-usd; None for
    an estimate with neither."""
    if config.budget is not None:
        return ledger.budget(config.budget).remaining_nanos
    if config.max_usd is not None:
        return to_nanos(config.max_usd)
    if estimate_only:
        return None
    raise ConfigError("give a budget: --budget NAME (see `runner budget create`) or --max-usd USD")


def _sweep_outputs(result: SweepResult, title: str, path: Path, html: Path | None, as_json: bool) -> None:
    """The sweep's Parquet, its comparison (terminal, --html, --json), and the exit code."""
    spec = result.plan.spec
    result.frame.write_parquet(path)
    cells = cell_report(result.frame, spec)
    compared = compare(result.frame, spec, cells)
    columns, rows = sweep_view.report_columns(spec), sweep_view.report_rows(cells, spec)
    if html is not None:
        first = spec.graders[0].name if spec.graders else ""
        page = html_report.render_sweep(title, cells, columns, rows, first, compared)
        html.write_text(page, encoding="utf-8")
    job = result.plan.expansion.job
    if as_json:
        document = {"parquet": str(path), "job": str(job), "cells": sweep_view.report_json(cells)}
        print_json({**document, "comparisons": sweep_view.comparisons_json(compared)})
    else:
        out.print(text_table(f"sweep {title}: cells (front: on the cost-score Pareto front)", columns, rows))
        print_unscored(cells, spec)
        print_comparisons(compared)
        judged = format_usd(result.judge.spent_nanos if result.judge else 0, places=6)
        spent = format_usd(result.run.spent_nanos, places=6)
        out.print(
            f"spent {spent} on the cells and {judged} on the judges; {len(result.frame)} rows written to "
            f"{path}; the job is {job}",
            highlight=False,
        )
    if result.run.state != "done" or (result.judge is not None and result.judge.state != "done"):
        raise typer.Exit(EXIT_RUN_STOPPED)
