"""Running a sweep: the cost matrix from real dry runs (cells, and the judges' calls apart), the budget
checks per cell and for the whole (or `fit`: the same dataset rows dropped from every cell), the run of
the expanded job, the judges' run under the same budget, and the result frame with its scores.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import polars as pl

from runner.app.expect import Expectation
from runner.app.modes import quoted_prices
from runner.app.preflight import budget_for
from runner.app.quote import Quoting, Reuse, quote_requests
from runner.app.report import run_frame
from runner.app.run import RunResult, run_job
from runner.app.scores import NO_SCORE, judge_score
from runner.app.sweep import Expansion, Spec, cell_key, expand, judge_line, load_spec
from runner.core import codec
from runner.core.config import RunConfig
from runner.core.errors import BudgetExceeded
from runner.core.events import Listener, Phase, ignore
from runner.core.jobs import iter_requests, validate_job
from runner.core.models import ChatRequest, Quote
from runner.core.money import format_usd, from_nanos, to_nanos
from runner.ledger import Ledger
from runner.providers.registry import Connection

BYTES_PER_ANSWER_TOKEN = 4  # a judged answer's stand-in for the estimate: its max_tokens of text


@dataclass
class CellQuote:
    key: str
    params: dict[str, Any]
    requests: int = 0
    nanos: int = 0  # to be sent (cached answers excluded)
    cached: int = 0
    unknown: int = 0  # requests no price could be quoted for (never shown as $0)
    judge_nanos: int = 0
    expected_nanos: int = 0  # what its requests are expected to cost (runner.app.expect)


@dataclass
class SweepPlan:
    spec: Spec
    expansion: Expansion
    cells: dict[str, CellQuote]
    rows_total: int
    # per dataset row, per cell: what its requests are quoted (with the row's judge calls, apart)
    by_row: dict[str, dict[str, int]] = field(default_factory=dict)
    judge_by_row: dict[str, int] = field(default_factory=dict)

    @property
    def nanos(self) -> int:
        return sum(c.nanos for c in self.cells.values())

    @property
    def expected_nanos(self) -> int:
        return sum(c.expected_nanos for c in self.cells.values())

    @property
    def judge_nanos(self) -> int:
        return sum(c.judge_nanos for c in self.cells.values())

    def over_cells(self) -> list[CellQuote]:
        limit = self.spec.per_cell_usd
        return [] if limit is None else [c for c in self.cells.values() if c.nanos > to_nanos(limit)]


@dataclass
class SweepResult:
    plan: SweepPlan
    run: RunResult
    judge: RunResult | None
    frame: pl.DataFrame


async def plan_sweep(
    spec: Spec,
    folder: Path,
    conn: Connection,
    ledger: Ledger,
    *,
    concurrency: int = 64,
    on_event: Listener = ignore,
    keep_rows: set[str] | None = None,
    cache: str = "reuse",
) -> SweepPlan:
    """Expand the spec, validate the job, and quote every cell from dry runs (answers the ledger
    holds cost nothing); the judges' calls are quoted on a stand-in answer of the graded request's
    longest reply."""
    expansion = await anyio.to_thread.run_sync(expand, spec, folder, keep_rows)
    summary = await anyio.to_thread.run_sync(validate_job, expansion.job, spec.models)
    summary.raise_for_issues()
    on_event(Phase("quoting", expansion.requests))
    cells = {cell_key(c): CellQuote(cell_key(c), c) for c in expansion.cells}
    plan = SweepPlan(spec, expansion, cells, len(expansion.rows))
    judged: list[ChatRequest] = []
    models = list(spec.matrix["model"])
    prices = quoted_prices(conn, spec.models)  # a batch sweep's quotes are at batch prices
    expect = await anyio.to_thread.run_sync(Expectation.load, ledger, conn.scope, prices, models)

    async def collect(requests: list[ChatRequest], quotes: list[Quote], reuse: list[Reuse | None]) -> None:
        for request, quote, used in zip(requests, quotes, reuse, strict=True):
            where = request.metadata["sweep"]
            cell = cells[where["cell"]]
            cell.requests += 1
            nanos = 0 if used is not None else (quote.nanos or 0)
            if nanos:
                cell.expected_nanos += expect.expected(request, quote)
            cell.cached += used is not None
            cell.unknown += used is None and quote.nanos is None
            cell.nanos += nanos
            row = plan.by_row.setdefault(where["row"], defaultdict(int))
            row[where["cell"]] += nanos
            if any(g.judge for g in spec.graders):
                judged.append(request)

    quoting = Quoting(cache=cache)
    await quote_requests(
        iter_requests(expansion.job, spec.models), conn, ledger, limits=concurrency, quoting=quoting,
        on_event=on_event,
        on_chunk=collect,
    )  # fmt: skip
    if judged:
        await _quote_judges(plan, judged, folder, conn, ledger, concurrency)
    return plan


async def _quote_judges(
    plan: SweepPlan,
    judged: list[ChatRequest],
    folder: Path,
    conn: Connection,
    ledger: Ledger,
    concurrency: int,
) -> None:
    judges = [g for g in plan.spec.graders if g.judge]
    lines = [
        (request, judge_line(g, request.custom_id, _stand_in(request), request.metadata["sweep"]["vars"]))
        for request in judged
        for g in judges
    ]
    path = folder / f"{plan.expansion.job.stem}-judge-estimate.jsonl"
    path.write_bytes(b"".join(codec.dumps(line) + b"\n" for _, line in lines))
    graded = {line["custom_id"]: request for request, line in lines}

    async def collect(requests: list[ChatRequest], quotes: list[Quote], _: list[Reuse | None]) -> None:
        for request, quote in zip(requests, quotes, strict=True):
            where = graded[request.custom_id].metadata["sweep"]
            plan.cells[where["cell"]].judge_nanos += quote.nanos or 0
            plan.judge_by_row[where["row"]] = plan.judge_by_row.get(where["row"], 0) + (quote.nanos or 0)

    requests = iter_requests(path, plan.spec.models)
    await quote_requests(requests, conn, ledger, limits=concurrency, on_chunk=collect)


def _stand_in(request: ChatRequest) -> str:
    """The longest answer the request can get, as text: what its judge is quoted on."""
    return "x" * BYTES_PER_ANSWER_TOKEN * int(request.body.get("max_tokens") or 1024)


def check_budget(plan: SweepPlan, remaining_nanos: int) -> None:
    """A cell over its budget, or the sweep (judges included) over the run's: refused, with the shortfall."""
    over = plan.over_cells()
    if over:
        limit = to_nanos(plan.spec.per_cell_usd) if plan.spec.per_cell_usd is not None else 0
        worst = max(over, key=lambda c: c.nanos)
        msg = (
            f"{len(over)} cell(s) over budget.per_cell_usd ({format_usd(limit)}); {worst.key} is quoted "
            f"{format_usd(worst.nanos)}, short by {format_usd(worst.nanos - limit)}; "
            "--fit runs the rows that fit"
        )
        raise BudgetExceeded(msg, budget="per cell", shortfall_nanos=worst.nanos - limit)
    needed = plan.nanos + plan.judge_nanos
    if needed > remaining_nanos:
        msg = (
            f"the sweep is quoted {format_usd(needed)} (judges {format_usd(plan.judge_nanos)}) and "
            f"{format_usd(remaining_nanos)} remains: short by {format_usd(needed - remaining_nanos)}; "
            "--fit runs the rows that fit"
        )
        raise BudgetExceeded(msg, budget="run", shortfall_nanos=needed - remaining_nanos)


def rows_that_fit(plan: SweepPlan, remaining_nanos: int) -> set[str]:
    """The longest run of dataset rows, in order, that every cell (and the whole) can pay for: the
    same rows in every cell, so the cells stay comparable."""
    limit = to_nanos(plan.spec.per_cell_usd) if plan.spec.per_cell_usd is not None else None
    spent: dict[str, int] = defaultdict(int)
    total, kept = 0, set()
    for row in plan.expansion.rows:
        costs = plan.by_row.get(row, {})
        row_total = sum(costs.values()) + plan.judge_by_row.get(row, 0)
        if total + row_total > remaining_nanos:
            break
        if limit is not None and any(spent[c] + n > limit for c, n in costs.items()):
            break
        for c, n in costs.items():
            spent[c] += n
        total += row_total
        kept.add(row)
    return kept


async def run_sweep(
    plan: SweepPlan, conn: Connection, ledger: Ledger, config: RunConfig, on_event: Listener = ignore
) -> SweepResult:
    """Run the expanded job, then the judges' calls on its answers, both under the budget that
    `config` names (`budget_for` makes one of --max-usd)."""
    budget_id = await anyio.to_thread.run_sync(budget_for, ledger, config)
    name = (await anyio.to_thread.run_sync(ledger.budget_by_id, budget_id)).name
    job = plan.expansion.job
    config = replace(config, job=job, budget=name, max_usd=None)
    main = await run_job(config, conn=conn, ledger=ledger, on_event=on_event, models=plan.spec.models)
    judge: RunResult | None = None
    judges = [g for g in plan.spec.graders if g.judge]
    answers = await anyio.to_thread.run_sync(run_frame, ledger, main.run_id)
    if judges and main.state == "done":
        lines = [
            judge_line(
                g, row["custom_id"], row["content"] or "", json.loads(row["metadata"])["sweep"]["vars"]
            )
            for row in answers.filter(pl.col("status") == "ok").iter_rows(named=True)
            for g in judges
        ]
        text = b"".join(codec.dumps(line) + b"\n" for line in lines)
        # named by its content, as the sweep's job is: other answers are another judges' job
        path = job.with_name(f"{job.stem}-judges-{hashlib.sha256(text).hexdigest()[:12]}.jsonl")
        path.write_bytes(text)
        judges_config = replace(
            config, job=path, run_id=None, new=False, retry_failed=False, retry_possibly_billed=False
        )
        judge = await run_job(
            judges_config, conn=conn, ledger=ledger, on_event=on_event, models=plan.spec.models
        )
    judged = await anyio.to_thread.run_sync(run_frame, ledger, judge.run_id) if judge else None
    bought = await anyio.to_thread.run_sync(ledger.source_prices, main.run_id)
    return SweepResult(plan, main, judge, sweep_frame(plan.spec, answers, judged, bought))


def sweep_of_run(ledger: Ledger, run_id: str) -> tuple[Spec, pl.DataFrame] | None:
    """For a sweep's run: its spec and result frame (with the judges' run of the same job, if any);
    None for a run of an ordinary job. A spec no longer where the sweep read it is a SpecError."""
    first = next(ledger.iter_request_rows(run_id, batch=1), [])  # one row says whether it is a sweep's
    text = first[0].get("metadata_json") if first else None
    sweep = json.loads(text).get("sweep") if text else None
    if not isinstance(sweep, dict) or "spec" not in sweep:
        return None
    spec = load_spec(Path(sweep["spec"]), models=None)  # checked when it ran
    answers = run_frame(ledger, run_id)
    job = Path(ledger.run(run_id).job_path)
    judges = [r for r in ledger.runs() if Path(r.job_path).name.startswith(f"{job.stem}-judges-")]
    judged = run_frame(ledger, judges[0].id) if judges else None  # the newest
    return spec, sweep_frame(spec, answers, judged, ledger.source_prices(run_id))


def sweep_frame(
    spec: Spec, answers: pl.DataFrame, judged: pl.DataFrame | None, bought: dict[str, int] | None = None
) -> pl.DataFrame:
    """One row per (dataset row × cell × repeat): the run's columns, the cell's parameters, the row id
    and variables, `answer_usd` (what the answer cost: this run's price, or for one answered from the
    ledger what it cost when bought, `bought`), and `score_<grader>` per grader (a judge's explanation
    and cost beside its score)."""
    bought = bought or {}
    if answers.is_empty():
        return answers
    rows: list[dict[str, Any]] = []
    judgements = _judgements(judged)
    taken = set(answers.columns)
    for row in answers.iter_rows(named=True):
        where = json.loads(row["metadata"])["sweep"]
        extra: dict[str, Any] = {"row_id": where["row"], "cell": where["cell"], "repeat": where["repeat"]}
        cost = bought.get(row["custom_id"])
        extra["answer_usd"] = row["price_usd"] if cost is None else from_nanos(cost)
        for name in spec.params[1:]:
            extra[name] = where["params"][name]
        for name, value in where["vars"].items():
            extra[name if name not in taken and name not in extra else f"var_{name}"] = value
        for grader in spec.graders:
            if grader.judge:
                score, text, price = judgements.get((grader.name, row["custom_id"]), (None, None, None))
                extra[f"score_{grader.name}"] = score
                extra[f"{grader.name}_explanation"] = text
                extra[f"{grader.name}_price_usd"] = price
                # a judge paid for whose text gives no score: a failed grade, said, never a silent null
                extra[f"{grader.name}_error"] = NO_SCORE if text is not None and score is None else None
            else:
                ok = row["status"] == "ok"
                score, failed = grader.grade(row["content"], where["vars"]) if ok else (None, None)
                extra[f"score_{grader.name}"] = score
                if grader.kind == "regex":
                    extra[f"{grader.name}_error"] = failed
        rows.append(extra)
    return pl.concat([answers, pl.DataFrame(rows, infer_schema_length=None)], how="horizontal")


def _judgements(judged: pl.DataFrame | None) -> dict[tuple[str, str], tuple[float | None, str | None, Any]]:
    if judged is None or judged.is_empty():
        return {}
    found = {}
    for row in judged.iter_rows(named=True):
        meta = json.loads(row["metadata"])
        text = row["content"] if row["status"] == "ok" else None
        found[(meta["judge"], meta["graded"])] = (judge_score(text), text, row["price_usd"])
    return found


__all__ = [
    "SweepPlan",
    "SweepResult",
    "check_budget",
    "plan_sweep",
    "rows_that_fit",
    "run_sweep",
]
