"""Shortcuts for notebooks and scripts: a job or a sweep end to end on an in-process simulator, and a
sweep on a connection of the caller's."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path

import anyio
import polars as pl

from runner.app.run import RunResult, run_job
from runner.app.sweep import Spec, load_spec
from runner.app.sweep_run import check_budget, plan_sweep, run_sweep
from runner.core.money import to_nanos
from runner.engine.engine import RunOptions
from runner.ledger import Ledger
from runner.providers.registry import Connection, ProviderSettings, connect


async def run_simulated(job: str | Path, max_usd: str = "1.00", ledger: Ledger | None = None) -> RunResult:
    """Run a job end to end on an in-process simulator (for notebooks and trying runner out)."""
    async with connect(ProviderSettings(name="simulator")) as conn:
        return await run_job(Path(job), conn=conn, ledger=ledger or Ledger(), max_usd=Decimal(max_usd))


async def sweep(
    spec: str | Path | Spec,
    *,
    conn: Connection,
    ledger: Ledger,
    budget: str,
    folder: str | Path = "results",
    options: RunOptions | None = None,
) -> pl.DataFrame:
    """Run a sweep (a spec, or the path of one) on a connection, under a budget of the ledger: the
    cells priced and checked first, then run, judged and graded. Returns the result frame (one row
    per dataset row × cell × repeat); `cell_report(frame, load_spec(path))` compares the cells."""
    spec = spec if isinstance(spec, Spec) else load_spec(Path(spec))
    plan = await plan_sweep(spec, Path(folder), conn, ledger)
    check_budget(plan, ledger.budget(budget).remaining_nanos)
    return (await run_sweep(plan, conn, ledger, budget, options or RunOptions())).frame


def sweep_simulated(
    spec: str | Path, max_usd: str = "1.00", folder: str | Path = "results", ledger: Ledger | None = None
) -> pl.DataFrame:
    """A sweep end to end on an in-process simulator, from synchronous code (a notebook): its frame."""
    book = ledger or Ledger()
    name = book.create_budget(
        f"sweep-{uuid.uuid4().hex[:8]}", to_nanos(Decimal(max_usd)), ephemeral=True
    ).name

    async def work() -> pl.DataFrame:
        async with connect(ProviderSettings(name="simulator")) as conn:
            return await sweep(spec, conn=conn, ledger=book, budget=name, folder=folder)

    return anyio.run(work)
