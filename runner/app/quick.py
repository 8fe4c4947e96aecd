"""Shortcuts for notebooks and scripts: a job or a sweep end to end on an in-process simulator, and a
sweep on a connection of the caller's."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import anyio
import polars as pl

from runner.app.preflight import budget_for
from runner.app.run import RunResult, run_job
from runner.app.sweep import Spec, load_spec
from runner.app.sweep_run import check_budget, plan_sweep, run_sweep
from runner.core.config import ProviderSettings, RunConfig
from runner.ledger import Ledger
from runner.providers.registry import Connection, connect


async def run_simulated(job: str | Path, max_usd: str = "1.00", ledger: Ledger | None = None) -> RunResult:
    """Run a job end to end on an in-process simulator (for notebooks and trying runner out)."""
    config = RunConfig(job=Path(job), provider=ProviderSettings(name="simulator"), max_usd=Decimal(max_usd))
    async with connect(config.provider) as conn:
        return await run_job(config, conn=conn, ledger=ledger or Ledger())


async def sweep(
    spec: str | Path | Spec,
    *,
    conn: Connection,
    ledger: Ledger,
    budget: str,
    folder: str | Path = "results",
    config: RunConfig | None = None,
) -> pl.DataFrame:
    """Run a sweep (a spec, or the path of one) on a connection, under a budget of the ledger: the
    cells priced and checked first, then run, judged and graded. Returns the result frame (one row
    per dataset row × cell × repeat); `cell_report(frame, load_spec(path))` compares the cells."""
    spec = spec if isinstance(spec, Spec) else load_spec(Path(spec))
    plan = await plan_sweep(spec, Path(folder), conn, ledger)
    check_budget(plan, ledger.budget(budget).remaining_nanos)
    config = replace(config or RunConfig(), budget=budget, max_usd=None)
    return (await run_sweep(plan, conn, ledger, config)).frame


def sweep_simulated(
    spec: str | Path, max_usd: str = "1.00", folder: str | Path = "results", ledger: Ledger | None = None
) -> pl.DataFrame:
    """A sweep end to end on an in-process simulator, from synchronous code (a notebook): its frame."""
    book = ledger or Ledger()
    config = RunConfig(provider=ProviderSettings(name="simulator"), max_usd=Decimal(max_usd))
    name = book.budget_by_id(budget_for(book, config)).name

    async def work() -> pl.DataFrame:
        async with connect(config.provider) as conn:
            return await sweep(spec, conn=conn, ledger=book, budget=name, folder=folder, config=config)

    return anyio.run(work)
