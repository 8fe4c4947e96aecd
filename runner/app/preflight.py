"""The pre-flight of a run: the run to send (resumed, or new with a row per line), every request
quoted (dry runs, or a price table's bound), the total checked against the budget, and what a killed
process left behind recovered. Nothing is sent here."""

from __future__ import annotations

import contextlib
import functools
import threading
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio

from runner.app.expect import Expectation
from runner.app.modes import quoted_prices
from runner.app.quote import QUOTE_MAX_AGE, Estimate, Quoting, Reuse, quote_requests
from runner.core import catalog, schema
from runner.core.catalog import ModelInfo
from runner.core.config import MAX_LINE_BYTES, RunConfig
from runner.core.errors import (
    BudgetExceeded,
    BudgetLimitTooLow,
    ConfigError,
    JobChanged,
    LedgerError,
    RunBusy,
    RunnerError,
    Unpriced,
)
from runner.core.events import Listener, Notice, Phase
from runner.core.jobs import JobSummary, file_digest, iter_requests
from runner.core.models import ChatRequest, Quote
from runner.core.money import format_usd, from_nanos, to_nanos
from runner.engine.plan import Plan, changed
from runner.ledger import OWNER_STALE_S, BudgetView, Ledger, metadata_text, owner_alive
from runner.providers.limits import Limits
from runner.providers.registry import Connection

OWNER_TOUCH_S = 5.0  # well under ledger.store.OWNER_STALE_S
PREPARING_POLL_S = 1.0  # how often a worker looks whether the run it waits for is ready


@dataclass(frozen=True)
class Checked:
    """A job validated against `models` (None: the catalog), what validation found, and the job's
    resolved path (the key its runs are found by)."""

    summary: JobSummary
    models: dict[str, ModelInfo] | None
    max_line: int = MAX_LINE_BYTES
    job_key: str = ""


def _take(iterator: Any, size: int) -> list[ChatRequest]:
    chunk: list[ChatRequest] = []
    for item in iterator:
        chunk.append(item)
        if len(chunk) >= size:
            break
    return chunk


# ---- pre-flight ---------------------------------------------------------------------------------


async def _sync_rows(ledger: Ledger, job: Path, run_id: str, checked: Checked) -> None:
    """Check that the rows of a run that exists still match the file: a new, changed or repeated
    line is an error (a run's rows are all made, with their quotes, before it sends anything)."""

    def work() -> None:
        iterator = iter_requests(job, checked.models, max_line=checked.max_line)
        while chunk := _take(iterator, 5000):
            rows = ledger.request_rows(run_id, [r.custom_id for r in chunk])
            missing = [r for r in chunk if r.custom_id not in rows]
            _check_unique(job, run_id, missing)
            if missing:
                raise changed(job, missing[0], run_id, "is new")
            for r in chunk:
                if rows[r.custom_id].sha256 != r.sha256:
                    raise changed(job, r, run_id, "changed")

    await anyio.to_thread.run_sync(work)


def _check_unique(job: Path, run_id: str, requests: list[ChatRequest]) -> None:
    """Rows are made once per custom_id: a file changed since validation may use one twice."""
    seen: set[str] = set()
    for request in requests:
        if request.custom_id in seen:
            raise changed(job, request, run_id, "is used twice")
        seen.add(request.custom_id)


def _row(
    run_id: str,
    request: ChatRequest,
    quote: Quote | None,
    reuse: Reuse | None = None,
    info: ModelInfo | None = None,
) -> dict[str, Any]:
    """A request's row; a request with no known price is skipped (it cannot be reserved); one
    answered from the ledger is a copy (of `reuse.source`, or of the identical line before it)."""
    known = quote is not None and quote.nanos is not None
    output_bound = schema.output_token_bound(request.body, info) if info is not None else None
    return {
        "run_id": run_id,
        "custom_id": request.custom_id,
        "line": request.line,
        "model": request.model,
        "sha256": request.sha256,
        "answer_key": request.answer_key,
        "cached_from": reuse.source if reuse is not None else None,
        "state": ("copy" if reuse is not None else "pending") if known else "skipped",
        "quote_nanos": quote.nanos if quote is not None and known else None,
        "quote_exact": bool(quote.exact) if quote is not None and known else False,
        "quote_source": quote.source if quote is not None and known else None,
        "output_bound": output_bound,
        "reserved_nanos": 0,
        "attempts": 0,
        "error_type": None if known else "no_quote",
        "error_message": None if known else "no price could be quoted",
        "metadata_json": metadata_text(request.metadata),
    }


async def recover(
    ledger: Ledger,
    run_id: str,
    retry_possibly_billed: bool,
    *,
    retry_failed: bool = False,
    worker: str | None = None,
) -> None:
    """After a crash: `sending` rows are unknown outcomes, each attempt recorded as such; `reserved`
    rows were never sent (`Ledger.recover_rows`; only `worker`'s rows when given). With
    `retry_possibly_billed` every possibly billed request of the run goes back to pending, what it
    held still counted as possibly billed (`Ledger.send_again`)."""

    def work() -> None:
        with ledger.transaction() as db:
            ledger.recover_rows(db, run_id, worker)
        if retry_possibly_billed:  # its own transaction: it reads what the one above wrote
            with ledger.transaction() as db:
                for row_id in ledger.possibly_billed(run_id, db):
                    ledger.send_again(db, row_id)
        if retry_failed:  # failed requests held nothing: back to pending, their attempts kept
            with ledger.transaction() as db:
                ledger.retry_failed(db, run_id)

    await anyio.to_thread.run_sync(work)


async def _find_or_make(
    config: RunConfig, job_key: str, conn: Connection, ledger: Ledger, owner: str, on_event: Listener
) -> tuple[str | None, str, int]:
    """The run this worker sends: (the existing run or None, its id, its budget). A new one is made
    in state `preparing`, unless another worker made the job's run at the same moment: that one is
    joined."""
    job, budget, max_usd, new = config.job, config.budget, config.max_usd, config.new
    existing = await _resumable(ledger, job_key, conn.scope, new, config.run_id, on_event)
    if existing and budget is not None and await _finished_elsewhere(ledger, existing, config):
        on_event(Notice(f"run {existing} of {job} is finished; a new run starts under budget '{budget}'"))
        existing = None
    budget_id = await anyio.to_thread.run_sync(budget_for, ledger, config, existing)
    if existing and max_usd is not None:
        await _apply_max_usd(ledger, existing, budget_id, max_usd, on_event)
    run_id = existing or uuid.uuid4().hex[:12]
    if not existing:  # its rows are made as the quotes come: one pass over the job for both
        create = functools.partial(ledger.create_run, owner=owner, state="preparing", join=not new)
        other = await anyio.to_thread.run_sync(create, run_id, job_key, budget_id, conn.scope)
        if other is not None:  # another worker started the job's run just now: this one joins it
            existing = await _resumable(ledger, job_key, conn.scope, new, other, on_event)
            if existing is None:
                msg = f"run {other}, which this worker was to join, was left while it was prepared; run again"
                raise RunBusy(msg, owner="another process")
            budget_id = await anyio.to_thread.run_sync(budget_for, ledger, config, existing)
            if max_usd is not None:
                await _apply_max_usd(ledger, existing, budget_id, max_usd, on_event)
            run_id = existing
    return existing, run_id, budget_id


async def prepare(
    config: RunConfig,
    checked: Checked,
    owner: str,
    conn: Connection,
    ledger: Ledger,
    on_event: Listener,
    limits: Limits,
) -> tuple[Plan, Estimate]:
    """The run to send (resumed or new, its rows made), quoted and checked against its budget; the
    quotes' estimate."""
    existing, run_id, budget_id = await _find_or_make(config, checked.job_key, conn, ledger, owner, on_event)
    joined = await anyio.to_thread.run_sync(ledger.join_run, run_id, owner, limits.window.maximum)
    if existing and joined.alone:  # answers paid for that an earlier worker could not write: first
        kept = await anyio.to_thread.run_sync(ledger.apply_kept_answers, run_id)
        if kept:
            on_event(Notice(f"{kept} answer(s) kept while the ledger could not be written are written now"))
    if joined.taken_over:
        on_event(
            Notice(
                f"{joined.taken_over} worker(s) of run {run_id} had stopped: their requests are taken over"
            )
        )
    claim = _KeptClaim(ledger, run_id, owner)  # the pre-flight of a big job takes minutes
    try:
        with claim:
            if existing:  # a resumed run's rows are checked against the file as it is
                await _sync_rows(ledger, config.job, existing, checked)
                what = "resuming" if joined.alone else "joining the workers of"
                on_event(Notice(f"{what} run {existing} of {config.job} (--new starts a fresh run)"))
            preparing = run_id if not existing else None
            estimate = await _quote(config, conn, ledger, preparing, checked, on_event, limits)
            if existing and joined.alone and (config.retry_possibly_billed or config.retry_failed):
                await recover(
                    ledger, existing, config.retry_possibly_billed, retry_failed=config.retry_failed
                )
            needed = await _needed(ledger, existing, estimate, config.admit)
            view = await anyio.to_thread.run_sync(ledger.budget_by_id, budget_id)
        if claim.lost:
            raise claim.busy()
        if not existing and estimate.unquoted_count and not config.partial:
            raise _unpriced(estimate, checked.summary.requests)
        if not config.partial:
            await _check_fits(
                ledger, needed, view, "expected cost" if config.admit == "expected" else "quoted total"
            )
    except BaseException as exc:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(ledger.leave_run, run_id, owner, (0, 0, 0))
        if not existing:  # a run refused (or stopped) before it sent anything leaves no trace
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(ledger.discard_run, run_id)
        if claim.lost and isinstance(exc, Exception) and not isinstance(exc, RunnerError):
            raise claim.busy() from None  # e.g. its rows' run was discarded by the process that took it
        raise
    plan = Plan(run_id, budget_id, bool(existing), owner, alone=joined.alone, slots=joined.slots)
    return plan, estimate


async def _needed(ledger: Ledger, existing: str | None, estimate: Estimate, admit: str) -> int:
    """What must fit the budget to start: the quoted total (`--admit bound`), or the expected cost;
    for a run that exists, what its pending requests hold (or are expected to cost)."""
    if not existing:
        return estimate.expected_nanos if admit == "expected" else estimate.total_nanos
    needed = await anyio.to_thread.run_sync(ledger.pending_quote_nanos, existing)
    if admit == "expected" and estimate.total_nanos:  # the pending part of the expected cost
        needed = needed * estimate.expected_nanos // estimate.total_nanos
    return needed


async def _check_fits(ledger: Ledger, needed: int, view: BudgetView, what: str = "quoted total") -> None:
    """BudgetExceeded, saying what to do, when `needed` does not fit the budget's remaining money."""
    fit, shortfall = fits_nanos(needed, view.remaining_nanos)
    if fit:
        return
    ephemeral = await anyio.to_thread.run_sync(ledger.budget_ephemeral, view.id)
    more = (
        f"give --max-usd at least {format_usd(view.limit_nanos + to_nanos(shortfall))}"
        if ephemeral
        else f"raise it (`runner budget raise {view.name} --by {shortfall}`)"
    )
    msg = (
        f"the {what} {format_usd(needed)} does not fit budget '{view.name}' "
        f"({format_usd(view.remaining_nanos)} remaining): short by {format_usd(shortfall)}; "
        f"{more}, or run what fits with --partial"
    )
    raise BudgetExceeded(msg, budget=view.name, shortfall_nanos=to_nanos(shortfall))


def _unpriced(estimate: Estimate, total: int) -> Unpriced:
    custom_id, reason = estimate.unquoted[0]
    msg = (
        f"{estimate.unquoted_count} of {total} requests could not be priced, so they cannot be reserved "
        f"against the budget (the first, '{custom_id}': {reason}); nothing was sent. Fix the cause and "
        "run again, or run the priced ones with --partial"
    )
    return Unpriced(msg, count=estimate.unquoted_count)


async def _resumable(
    ledger: Ledger, job_key: str, scope: str, new: bool, run_id: str | None, on_event: Listener
) -> str | None:
    """The run to go on with (the one named, else the job's newest); None for a fresh start. A run
    another live process is still preparing is waited for (then joined); one left while it was being
    prepared (nothing sent yet) is discarded."""
    if run_id is not None:
        named = await anyio.to_thread.run_sync(ledger.run, run_id)
        if named.job_path != job_key or named.provider != scope:
            where = named.provider.split(":", 1)[0]
            msg = f"run {named.id} is a run of {named.job_path} on {where}, not of this job"
            raise ConfigError(msg)
        existing: str | None = named.id
    else:
        existing = None if new else await anyio.to_thread.run_sync(ledger.latest_run, job_key, scope)
    if existing is None:
        return None
    told = False
    while True:
        info = await anyio.to_thread.run_sync(ledger.run, existing)
        if info.state != "preparing":
            if info.total:
                return existing
            # its rows were left half made by a version before `preparing`; it sent nothing, so it
            # starts afresh (should it have sent, it is kept, and its missing lines are named)
            with contextlib.suppress(LedgerError):
                await anyio.to_thread.run_sync(ledger.discard_run, existing)
                return None
            return existing
        if not info.owner or not owner_alive(info.owner, info.seen_at, OWNER_STALE_S):
            await anyio.to_thread.run_sync(ledger.discard_run, existing)
            return None
        if not told:
            on_event(
                Notice(
                    f"run {existing} is being prepared by {info.owner}: this worker joins it once it is ready"
                )
            )
            told = True
        await anyio.sleep(PREPARING_POLL_S)


async def _finished_elsewhere(ledger: Ledger, run_id: str, config: RunConfig) -> bool:
    """A finished run (nothing pending, nothing to retry) under another budget than the one given:
    running the job again under that budget is a new run, not an error."""
    assert config.budget is not None
    info = await anyio.to_thread.run_sync(ledger.run, run_id)
    view = await anyio.to_thread.run_sync(ledger.budget, config.budget)
    unfinished = any(info.states.get(state) for state in ("pending", "sending", "reserved"))
    to_retry = config.retry_failed and info.states.get("failed")
    return info.state == "done" and not unfinished and not to_retry and view.id != info.budget_id


class _KeptClaim:
    """Keeps this worker's sign of life fresh while it prepares (the engine keeps it while it runs):
    a pre-flight longer than the workers' lapse would otherwise let another worker take it for
    gone, or another process discard the run it is making. A thread of its own, so that no step of
    the pre-flight has to remember it."""

    def __init__(self, ledger: Ledger, run_id: str, owner: str) -> None:
        self.ledger, self.run_id, self.owner = ledger, run_id, owner
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="runner-claim", daemon=True)

    def __enter__(self) -> _KeptClaim:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self) -> RunBusy:
        msg = f"run {self.run_id} was taken over by another process while this one prepared it"
        return RunBusy(msg, owner="another process")

    def _keep(self) -> None:
        while not self._stop.wait(OWNER_TOUCH_S):
            try:
                with self.ledger.transaction() as tx:
                    if not self.ledger.touch_worker(tx, self.run_id, self.owner):
                        self.lost = True
                        return
            except Exception:  # noqa: S112 - a busy ledger: the next touch tries again
                continue


async def _quote(
    config: RunConfig,
    conn: Connection,
    ledger: Ledger,
    preparing: str | None,
    checked: Checked,
    on_event: Listener,
    limits: Limits,
) -> Estimate:
    """Quote the job; for a run being prepared, make each line's row with its quote on the way."""
    job, total = config.job, 0

    async def add_rows(chunk: list[ChatRequest], quotes: list[Quote], reuse: list[Reuse | None]) -> None:
        nonlocal total
        assert preparing is not None
        rows = [
            _row(preparing, r, q, u, table.get(r.model)) for r, q, u in zip(chunk, quotes, reuse, strict=True)
        ]
        await anyio.to_thread.run_sync(ledger.add_requests, rows)
        total += len(chunk)

    summary = checked.summary
    table = checked.models if checked.models is not None else catalog.MODELS
    expect = await anyio.to_thread.run_sync(
        Expectation.load, ledger, conn.scope, quoted_prices(conn, table), list(summary.per_model)
    )
    on_event(Phase("quoting", summary.requests))
    # Rows are made only from the file as it was validated: this read's digest is compared with
    # validation's before anything is sent (when validation took none, each line is checked again);
    # a row's line is checked by its hash before it is sent.
    digest = file_digest() if preparing and summary.digest else None
    estimate = await quote_requests(
        iter_requests(
            job,
            checked.models,
            check=bool(preparing) and digest is None,
            digest=digest,
            max_line=checked.max_line,
        ),
        conn,
        ledger,
        limits=limits,
        # a run that exists holds the quotes its rows were made with; its kept quotes are only shown
        quoting=Quoting(config.cache, QUOTE_MAX_AGE if preparing else None, config.policy, expect),
        on_event=on_event,
        on_chunk=add_rows if preparing else None,
    )
    if digest is not None and digest.hexdigest() != summary.digest:
        msg = f"{job} changed while the run was being prepared (nothing was sent); run the command again"
        raise JobChanged(msg)
    if preparing:
        await anyio.to_thread.run_sync(ledger.set_total, preparing, total)
    return estimate


def fits_nanos(needed: int, remaining: int) -> tuple[bool, Decimal]:
    return needed <= remaining, from_nanos(max(0, needed - remaining))


async def _apply_max_usd(
    ledger: Ledger, run_id: str, budget_id: int, max_usd: Decimal, on_event: Listener
) -> None:
    """--max-usd given for a run that exists (resumed or joined): it is that run's own limit, so the
    run's budget takes it (after a budget stop, the same command with a higher --max-usd goes on).
    A run held against a named budget is not changed by it: that budget may be shared."""
    view = await anyio.to_thread.run_sync(ledger.budget_by_id, budget_id)
    if not await anyio.to_thread.run_sync(ledger.budget_ephemeral, budget_id):
        msg = (
            f"run {run_id} is held against budget '{view.name}', which --max-usd does not change: "
            f"raise it with `runner budget raise {view.name} --to USD`, or start a new run with --new"
        )
        raise ConfigError(msg)
    limit = to_nanos(max_usd)
    if limit == view.limit_nanos:
        return
    try:
        await anyio.to_thread.run_sync(ledger.set_limit, view.name, limit)
    except BudgetLimitTooLow:
        held = view.spent_nanos + view.reserved_nanos + view.possibly_billed_nanos
        msg = (
            f"--max-usd {max_usd} is below what run {run_id} has already spent and holds "
            f"({format_usd(held)}); give at least that"
        )
        raise ConfigError(msg) from None
    on_event(
        Notice(f"run {run_id}: its limit is now {format_usd(limit)} (was {format_usd(view.limit_nanos)})")
    )


def budget_for(ledger: Ledger, config: RunConfig, existing: str | None = None) -> int:
    """The budget a run is held against: a resumed run's own; else the named budget (--budget); else
    an ephemeral one made with the run's own cap (--max-usd)."""
    if existing:  # a resumed run keeps the budget it began with
        budget_id = int(ledger.run(existing).budget_id)
        if config.budget is not None and ledger.budget(config.budget).id != budget_id:
            msg = f"run {existing} belongs to another budget; resume it without --budget, or use --new"
            raise ConfigError(msg)
        return budget_id
    if config.budget is not None:
        return ledger.budget(config.budget).id
    if config.max_usd is not None:
        name = f"max-usd-{uuid.uuid4().hex[:8]}"
        return ledger.create_budget(name, to_nanos(config.max_usd), ephemeral=True).id
    msg = "give a budget: --budget NAME (see `runner budget create`) or --max-usd USD"
    raise ConfigError(msg)
