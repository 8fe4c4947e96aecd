"""Running a job: validation, the pre-flight (runner/preflight.py), then the run phase
(runner/engine.py), and how a run ends: done, stopped, or its ledger gone from under it."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import anyio

from runner.app.modes import choose_mode, quoting, recorded_mode
from runner.app.preflight import Checked, prepare, recover
from runner.app.quote import Estimate
from runner.app.reconcile import charges_by_attempt, provider_books, reconcile_with_charges
from runner.core.catalog import ModelInfo
from runner.core.config import RunConfig
from runner.core.errors import LedgerUnavailable, RunBusy, RunnerError
from runner.core.events import Listener, Notice, Phase, ignore
from runner.core.jobs import JobSummary, validate_job
from runner.core.money import to_nanos
from runner.engine.batches import BatchRun
from runner.engine.engine import Engine
from runner.engine.plan import Plan
from runner.engine.state import EngineState
from runner.ledger import Ledger, worker_name
from runner.providers.limits import Limits
from runner.providers.registry import Connection


@dataclass
class RunResult:
    run_id: str
    resumed: bool
    state: str
    reason: str | None
    states: dict[str, int]
    spent_nanos: int
    estimate: Estimate
    resumable: bool = True  # False when running the same command again cannot finish the run
    last: bool = True  # this worker finished the run (False: it left while others still send it)


async def run_job(
    config: RunConfig,
    *,
    conn: Connection,
    ledger: Ledger,
    on_event: Listener = ignore,
    summary: JobSummary | None = None,
    models: dict[str, ModelInfo] | None = None,
) -> RunResult:
    """Validate `config.job` (against `models`, unless given the job's `summary`), quote, check the
    budget, then run or resume."""
    job = config.job
    if summary is None:
        summary = await anyio.to_thread.run_sync(validate_job, job, models, config.max_line_bytes)
    summary.raise_for_issues()
    owner = worker_name()  # this process's worker on the run (several may send one run)
    job_key = str(await anyio.Path(job).resolve())
    checked = Checked(summary, models, config.max_line_bytes, job_key)
    limits = Limits.of(config)  # the dry runs' and the calls'
    recorded = await anyio.to_thread.run_sync(recorded_mode, ledger, config, job_key, conn.scope)
    mode, why = choose_mode(config, conn, summary, recorded)
    if why:
        on_event(Notice(why))
    plan, estimate = await prepare(config, checked, owner, quoting(conn, mode), ledger, on_event, limits)
    run_id = plan.run_id
    ender: EngineState | None = None
    last = False
    try:
        ender = await _phases(conn, ledger, plan, config, on_event, limits, mode)
    finally:  # its claims go back to the pool; the run's last worker finishes the run
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            counts = [0, 0, 0] if ender is None else ender.counts
            last = await anyio.to_thread.run_sync(ledger.leave_run, run_id, owner, counts)
    assert ender is not None
    return await _ended(conn, ledger, plan, ender, estimate, last=last)


async def _phases(
    conn: Connection,
    ledger: Ledger,
    plan: Plan,
    config: RunConfig,
    on_event: Listener,
    limits: Limits,
    mode: str,
) -> EngineState:
    """The run phase: its batches (batch mode, or a run with batches open), then what is left as
    calls; what ran last, to say how the run ended."""
    run_id, job = plan.run_id, config.job
    await anyio.to_thread.run_sync(ledger.set_run_mode, run_id, mode)
    parts = await anyio.to_thread.run_sync(lambda: ledger.parts(run_id, open_only=True))
    if mode == "batch" or parts:
        if not plan.alone:
            msg = f"run {run_id} is sent in batches by another worker: one worker collects a run's batches"
            raise RunBusy(msg, owner="another worker")
        batches = BatchRun(conn, ledger, plan, config, on_event)
        try:
            switched = await batches.run(job, to_sync=mode == "sync")
        except BaseExceptionGroup as group:  # its task group wraps what the batches' loop raised
            raise _sole_runner_error(group) or group from None
        if not switched or batches.stopping.is_set():
            return batches
    engine = await _start(conn, ledger, plan, config, on_event, limits)
    try:
        await engine.run(job)
    except BaseExceptionGroup as group:  # the task groups wrap what a worker or the reader raised
        # the requests it cut off are unknown outcomes; marked now if the ledger can be written,
        # else by the next run
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await recover(ledger, run_id, retry_possibly_billed=False, worker=plan.owner)
        raise _sole_runner_error(group) or group from None
    if engine.aborted:
        with anyio.CancelScope(shield=True):
            await recover(ledger, run_id, retry_possibly_billed=False, worker=plan.owner)
    return engine


async def _ended(
    conn: Connection, ledger: Ledger, plan: Plan, engine: EngineState, estimate: Estimate, *, last: bool
) -> RunResult:
    """How this worker's part of the run ended; the run's last worker finishes the run."""
    run_id, job = plan.run_id, engine.config.job
    with anyio.CancelScope(shield=True):  # lines identical to one answered now
        await anyio.to_thread.run_sync(ledger.fill_copies, run_id)
    info = await anyio.to_thread.run_sync(ledger.run, run_id)
    left = info.states.get("pending", 0)
    state, reason = (engine.state, engine.reason) if engine.stopping.is_set() else ("done", None)
    states, spent = info.states, info.spent_nanos
    if not last:  # the others go on with the run, and the last of them finishes it
        return RunResult(run_id, plan.resumed, state, reason, states, spent, estimate, last=False)
    lines_missing = bool(left) and not engine.stopping.is_set()
    if lines_missing:  # every line was read, and some rows were not sent
        state = "stopped"
        reason = (
            f"{left} request(s) of the run have no line in {job} any more; restore those lines, "
            "or start a fresh run with --new"
        )
    over = await anyio.to_thread.run_sync(ledger.over_hold, run_id)
    if over and reason is not None and reason.startswith("budget reached"):  # counted now, all settled
        reason += (
            f" ({over} request(s) of the run were charged above their holds: the server reported more "
            "tokens than they allowed, or the price file's prices or allowances are too low; the excess "
            "counted against the budget before the next reservation, so only requests already in flight "
            "could add to it)"
        )
    damage = await anyio.to_thread.run_sync(ledger.damage)  # SQLite's quick check of the file
    if damage is not None:
        state, reason = (
            "stopped",
            (
                f"the ledger {ledger.db.path} is damaged ({damage}): copy what can be read elsewhere and "
                "restore it from a backup (`runner ledger backup` makes one) before going on"
            ),
        )
    with anyio.CancelScope(shield=True):
        await note_balance(conn, ledger, run_id, "after")
        await anyio.to_thread.run_sync(ledger.finish_run, run_id, state, reason)
    if engine.ledger_gone:
        raise await _ledger_saved(ledger, run_id, engine.ledger_gone)
    return RunResult(run_id, plan.resumed, state, reason, states, spent, estimate, not lines_missing)


async def _start(
    conn: Connection, ledger: Ledger, plan: Plan, config: RunConfig, on_event: Listener, limits: Limits
) -> Engine:
    """The engine for this worker, once answers kept from earlier runs are copied and (for the
    first worker of a resumed run) the provider's books have settled what a crash left."""
    run_id = plan.run_id
    await anyio.to_thread.run_sync(ledger.fill_copies, run_id)
    if plan.alone:
        if plan.resumed and not config.retry_possibly_billed:
            await reconcile_first(conn, ledger, run_id)
        await note_balance(conn, ledger, run_id, "before")
    pending = (await anyio.to_thread.run_sync(ledger.run, run_id)).states.get("pending", 0)
    engine = Engine(conn, ledger, plan, config, on_event, limits)
    on_event(Phase("running", pending))
    return engine


async def note_balance(conn: Connection, ledger: Ledger, run_id: str, which: str) -> None:
    """Record the provider's balance as the run begins or ends (reconciliation by balance), where the
    provider reports one; a balance that cannot be had is left unrecorded."""
    balance = getattr(conn.provider, "balance", None)
    if balance is None:
        return
    with anyio.move_on_after(10):
        try:
            value = to_nanos(await balance())
        except (RunnerError, ArithmeticError, ValueError):
            return
        await anyio.to_thread.run_sync(functools.partial(ledger.set_run_balance, run_id, **{which: value}))


async def reconcile_first(conn: Connection, ledger: Ledger, run_id: str) -> None:
    """A resumed run with possibly billed requests: resolved from the provider's charges when it
    lists them (charged ones are paid, the others are sent again by this run)."""
    info = await anyio.to_thread.run_sync(ledger.run, run_id)
    if not info.states.get("possibly_billed"):
        return
    try:
        books = await provider_books(conn.provider)
    except RunnerError:
        return
    if books is not None:
        await anyio.to_thread.run_sync(reconcile_with_charges, ledger, run_id, charges_by_attempt(books))


def _sole_runner_error(group: BaseExceptionGroup[Any]) -> RunnerError | None:
    """The first of the group's errors when all of them are runner's own (a user-facing message)."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    if leaves and all(isinstance(exc, RunnerError) for exc in leaves):
        first = leaves[0]
        assert isinstance(first, RunnerError)
        return first
    return None


async def _ledger_saved(ledger: Ledger, run_id: str, gone: str) -> LedgerUnavailable:
    """The ledger's file went while the run was writing to it: what the run recorded is copied back
    to its path (or beside it when another file took its place), and the run stops there."""
    path = ledger.db.path
    with anyio.CancelScope(shield=True):
        where = await anyio.to_thread.run_sync(ledger.db.save_copy, f"{path}.saved-{run_id}")
    resume = (
        "run the same command again to resume" if where == path else f"use --db sqlite:///{where} to resume"
    )
    msg = (
        f"the ledger file {path} was {gone} during run {run_id}: nothing more was sent after that; "
        f"what the run recorded was saved to {where}; {resume}"
    )
    return LedgerUnavailable(msg, path=path, reason=gone)


__all__ = ["RunResult", "run_job"]
