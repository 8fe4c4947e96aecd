"""Planning a sweep before spending: how many dataset rows each paired comparison needs to detect a
difference of a given size at 80 % power, what those rows cost per cell and in all (from the sweep's
dry-run quotes), and with a budget the smallest difference it can detect.

The spread of a paired difference comes from the newest earlier run of the same spec in the ledger
(its per-row differences, for that pair and grader), else from a stated conservative default."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.app import stats
from runner.app.compare import cell_pairs, compare
from runner.app.sweep import Spec
from runner.app.sweep_run import SweepPlan, sweep_of_run
from runner.ledger import Ledger


@dataclass(frozen=True)
class PairPlan:
    a: str
    b: str
    grader: str
    sd: float  # of the per-row difference
    sd_from: str  # "run RUN" or "default"
    rows: int  # rows needed
    a_nanos: int  # what those rows cost in cell a
    b_nanos: int


@dataclass(frozen=True)
class PowerPlan:
    detect: float
    pairs: list[PairPlan]
    rows: int  # the most any pair needs: what every cell runs
    dataset_rows: int
    total_nanos: int  # every cell (and its judges) at `rows` rows
    budget_rows: int | None = None  # rows of every cell the budget buys (at most the dataset's)
    detectable: float | None = None  # the smallest difference those rows detect (the widest spread)

    def as_json(self) -> dict[str, Any]:
        return {
            "detect": self.detect,
            "power": stats.POWER,
            "alpha": round(1 - stats.CONFIDENCE, 10),
            "rows": self.rows,
            "dataset_rows": self.dataset_rows,
            "total_usd": f"{self.total_nanos / 1e9:.9f}",
            "budget_rows": self.budget_rows,
            "detectable": self.detectable,
            "pairs": [
                {
                    "a": p.a,
                    "b": p.b,
                    "grader": p.grader,
                    "sd": p.sd,
                    "sd_from": p.sd_from,
                    "rows": p.rows,
                    "a_usd": f"{p.a_nanos / 1e9:.9f}",
                    "b_usd": f"{p.b_nanos / 1e9:.9f}",
                }
                for p in self.pairs
            ],
        }


def earlier_spread(ledger: Ledger, spec: Spec) -> tuple[str, dict[tuple[str, str, str], float]] | None:
    """(run id, {(a, b, grader): sd of the per-row difference}) from the newest run of this spec."""
    for run in ledger.runs():
        first = next(ledger.iter_request_rows(run.id, batch=1), [])
        text = first[0].get("metadata_json") if first else None
        where = json.loads(text).get("sweep") if text else None
        if not isinstance(where, dict) or Path(str(where.get("spec"))).resolve() != spec.path.resolve():
            continue
        found = sweep_of_run(ledger, run.id)
        if found is None or found[1].is_empty():
            continue
        spread = {
            (c.a, c.b, c.grader): c.sd for c in compare(found[1], spec) if c.sd is not None and c.rows >= 2
        }
        return run.id, spread
    return None


def per_row_nanos(plan: SweepPlan) -> dict[str, float]:
    """What one dataset row costs in each cell, judges included (the quotes averaged over the rows)."""
    rows = max(1, plan.rows_total)
    return {key: (cell.nanos + cell.judge_nanos) / rows for key, cell in plan.cells.items()}


def plan_power(
    plan: SweepPlan,
    detect: float,
    earlier: tuple[str, dict[tuple[str, str, str], float]] | None,
    remaining: int | None,
) -> PowerPlan:
    """Rows and money each pair needs to detect `detect` (a difference in score, 0.05 = 5 points)."""
    spec = plan.spec
    per_row = per_row_nanos(plan)
    run_id, spread = earlier if earlier is not None else ("", {})
    pairs: list[PairPlan] = []
    for g in spec.graders:
        for a, b in cell_pairs(spec, list(plan.cells)):
            found = spread.get((a, b, g.name))
            sd, source = (found, f"run {run_id}") if found else (stats.DEFAULT_SD, "default")
            rows = stats.rows_needed(detect, sd)
            pairs.append(
                PairPlan(
                    a, b, g.name, sd, source, rows, math.ceil(rows * per_row[a]), math.ceil(rows * per_row[b])
                )
            )
    rows = max((p.rows for p in pairs), default=0)
    total = math.ceil(rows * sum(per_row.values()))
    result = PowerPlan(detect, pairs, rows, plan.rows_total, total)
    if remaining is None or not pairs:
        return result
    cost = sum(per_row.values())
    affordable = plan.rows_total if cost <= 0 else min(plan.rows_total, int(remaining // cost))
    widest = max(p.sd for p in pairs)
    return PowerPlan(
        detect,
        pairs,
        rows,
        plan.rows_total,
        total,
        affordable,
        stats.detectable(affordable, widest) if affordable >= 2 else None,
    )


def rows_for(plan: SweepPlan, power: PowerPlan) -> set[str]:
    """The first rows of the dataset, as many as the plan needs (all when it needs more)."""
    return set(plan.expansion.rows[: power.rows])
