"""Commands on runs kept in the ledger (runs, status, report, export, reconcile), the provider's
balance, and the simulator."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import anyio
import typer

from runner.app.compare import cell_report, compare
from runner.app.export import export_jsonl, export_parquet
from runner.app.reconcile import BudgetReconciliation, Reconciliation, reconcile_batches, reconcile_run
from runner.app.report import REPORT_NEEDS, run_frame
from runner.app.sweep_run import sweep_of_run
from runner.cli import html_report, sweep_view
from runner.cli.app import app, check_writable, export_to
from runner.cli.console import (
    EXIT_BOOKS_DIFFER,
    budget_table,
    friendly,
    out,
    print_report,
    run_async,
    runs_table,
    text_table,
)
from runner.cli.documents import (
    batches_json,
    batches_table,
    budget_json,
    budget_reconciliation_json,
    print_budget_reconciliation,
    print_json,
    print_reconciliation,
    reconciliation_json,
    report_json,
    run_json,
    usd,
    worker_json,
    workers_table,
)
from runner.cli.jobs import print_comparisons, print_unscored
from runner.cli.options import DbOpt, Flags, JsonOpt, config_options
from runner.core.config import BALANCE, RECONCILE, ProviderSettings
from runner.core.errors import ConfigError, RunBusy
from runner.core.money import format_usd, to_nanos
from runner.ledger import Ledger, RunView, worker_name
from runner.providers.orthogonal import OrthogonalProvider
from runner.providers.registry import connect, provider_of_scope

# `runner simulator` is realistic unless told otherwise: calls of a second or two, dry runs a round trip
SIMULATED_LATENCY = "0.5-2"
SIMULATED_DRY_RUN_LATENCY = "0.05-0.2"


@app.command()
@friendly
@config_options(RECONCILE)
def reconcile(
    run_id: Annotated[
        str | None, typer.Argument(help="The run (its id or the start of it); the newest by default.")
    ] = None,
    budget: Annotated[
        str | None, typer.Option("--budget", help="Every run of this budget, and the budget's total.")
    ] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    *,
    flags: Flags,
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
    settings = ProviderSettings.from_flags(**flags)
    results = [_reconcile_one(ledger, info, settings, alone=budget is None) for info in runs]
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


def _reconcile_one(ledger: Ledger, info: RunView, given: ProviderSettings, *, alone: bool) -> Reconciliation:
    """One run against the books of the provider endpoint it ran on. A run on a provider that keeps
    no books runner can read is an error when asked for alone, and a run with no figure in a budget's."""
    name, base_url, sim_pricing = provider_of_scope(info.provider)
    if name == "openai" and ledger.parts(info.id):  # a batch run: the provider's output files
        settings = replace(given, name=name, base_url=base_url, max_connections=8)

        async def output() -> Reconciliation:
            async with connect(settings) as conn:
                assert conn.batches is not None
                return await reconcile_batches(ledger, info.id, conn.batches)

        return run_async(output)
    if name != "orthogonal":
        msg = (
            f"run {info.id} ran on {name}, which keeps no books runner can read (a charge list or a "
            "balance): nothing to reconcile with"
        )
        if alone:
            raise ConfigError(msg)
        budget = ledger.budget_by_id(info.budget_id).name
        return Reconciliation(info.id, budget, "none", ledger_nanos=info.spent_nanos, note=msg)
    settings = replace(given, name=name, base_url=base_url, sim_pricing=sim_pricing, max_connections=8)
    worker = worker_name()
    # not while workers send it; joining alone recovers what a crash left in flight
    if not ledger.join_run(info.id, worker, 0, to_send=False).alone:
        ledger.leave_run(info.id, worker, (0, 0, 0), forget=True)
        msg = f"run {info.id} is being sent by other workers; reconcile it once they have finished"
        raise RunBusy(msg, owner="other workers")

    async def work() -> Reconciliation:
        async with connect(settings) as conn:
            return await reconcile_run(ledger, info.id, conn.provider)

    try:
        return run_async(work)
    finally:
        ledger.leave_run(info.id, worker, (0, 0, 0), forget=True)


@app.command()
@friendly
@config_options(BALANCE)
def balance(db: DbOpt = None, as_json: JsonOpt = False, *, flags: Flags) -> None:
    """The provider's balance, next to the ledger's budgets."""
    settings = replace(ProviderSettings.from_flags(**flags), max_connections=8)
    if settings.name != "orthogonal":
        raise ConfigError(f"{settings.name} reports no balance runner can read (the Run API does)")
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
    found = Ledger.for_reading(db).runs()
    if as_json:
        print_json([run_json(r) for r in found])
        return
    out.print(runs_table(found))


@app.command()
@friendly
def status(run_id: str, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """One run: its state, request counts and money, and the workers that sent it."""
    ledger = Ledger.for_reading(db)
    r = ledger.run(run_id)
    crew = ledger.workers(r.id)
    parts = ledger.parts(r.id)
    if as_json:
        print_json({**run_json(r), "workers": [worker_json(w) for w in crew], "batches": batches_json(parts)})
        return
    out.print(f"run {r.id} · {r.job_path} · {r.provider}", highlight=False)
    out.print(f"state: {r.state}" + (f" ({r.reason})" if r.reason else ""), highlight=False)
    for state, count in sorted(r.states.items()):
        out.print(f"  {state}: {count}", highlight=False)
    out.print(f"spent: {format_usd(r.spent_nanos, places=9)}", highlight=False)
    if crew:
        out.print(workers_table(crew))
    if parts:
        out.print(batches_table(parts))


@app.command("export")
@friendly
def export_cmd(
    run_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    fmt: Annotated[str, typer.Option("--format", help="parquet | jsonl (OpenAI Batch output)")] = "parquet",
    db: DbOpt = None,
) -> None:
    """Write a run's results to Parquet, or to the OpenAI Batch output JSONL shape."""
    ledger = Ledger.for_reading(db)
    run_info = ledger.run(run_id)
    if fmt not in ("parquet", "jsonl"):
        msg = f"--format: '{fmt}' is not parquet or jsonl"
        raise ConfigError(msg)
    path = output or Path("results") / f"{Path(run_info.job_path).stem}-{run_info.id}.{fmt}"
    check_writable(path)
    writer = export_parquet if fmt == "parquet" else export_jsonl
    rows = export_to(writer, ledger, run_info.id, path)
    out.print(f"{rows} rows written to {path}", highlight=False)


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
    ledger = Ledger.for_reading(db)
    run = ledger.run(run_id)
    swept = sweep_of_run(ledger, run.id)
    cells = cell_report(swept[1], swept[0]) if swept else None
    compared = compare(swept[1], swept[0], cells) if swept else []
    if as_json:
        document = report_json(ledger, run)
        if cells is not None:
            document["cells"] = sweep_view.report_json(cells)
            document["comparisons"] = sweep_view.comparisons_json(compared)
        print_json(document)
    else:
        print_report(ledger, run.id)
        if swept and cells is not None:
            columns, rows = sweep_view.report_columns(swept[0]), sweep_view.report_rows(cells, swept[0])
            out.print(text_table(f"sweep {swept[0].path.stem}: cells", columns, rows))
            print_unscored(cells, swept[0])
            print_comparisons(compared)
    if html is not None:
        try:
            html.parent.mkdir(parents=True, exist_ok=True)
            page = html_report.render(run, run_frame(ledger, run.id, REPORT_NEEDS), ledger.by_mode(run.id))
            if swept and cells is not None:  # a sweep's run: the cells' comparison
                spec = swept[0]
                columns, rows = sweep_view.report_columns(spec), sweep_view.report_rows(cells, spec)
                first = spec.graders[0].name if spec.graders else ""
                page = html_report.render_sweep(spec.path.stem, cells, columns, rows, first, compared)
            html.write_text(page, encoding="utf-8")
        except OSError as exc:
            msg = f"{html}: cannot write the report: {exc.strerror}"
            raise ConfigError(msg) from None
        out.print(f"HTML report written to {html}", highlight=False)


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
    batch_duration: Annotated[
        float, typer.Option("--batch-duration", help="Seconds a batch takes once in progress.")
    ] = 3.0,
) -> None:
    """Serve the simulated Run API and OpenAI-compatible API, its Batch API included (fake answers,
    real protocol)."""
    from runner.simulator import Books, parse_latency, serve  # noqa: PLC0415 - only this command serves

    books = Books(
        pricing=pricing,
        latency=parse_latency(latency),
        dry_run_latency=parse_latency(dry_run_latency),
        fault_rate=fault_rate,
        api_key=api_key,
        batch_duration=batch_duration,
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
