"""A sweep's comparison: per cell, each grader's score over dataset rows (a row's repeats reduced
first) with its 95 % interval, cost and cost per correct answer with an interval, the Pareto front;
then paired comparisons of cells on the rows both answered, Holm-adjusted, read as sentences."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl

from runner.app import stats
from runner.app.sweep import Grader, Spec, cell_key

Scores = dict[str, dict[str, float]]  # cell → row id → the row's reduced score


def row_scores(frame: pl.DataFrame, grader: Grader) -> Scores:
    """Each (cell, row)'s repeats reduced by the grader's reducer (ungraded repeats left out)."""
    column = f"score_{grader.name}"
    gathered: dict[tuple[str, str], list[float]] = defaultdict(list)
    for cell, row, score in frame.select("cell", "row_id", column).iter_rows():
        if score is not None:
            gathered[(cell, str(row))].append(float(score))
    found: Scores = defaultdict(dict)
    for (cell, row), scores in gathered.items():
        k = min(grader.k, len(scores))  # a row short of k graded samples: pass@ what it has
        value = stats.reduce_scores(scores, grader.reducer, k)
        if value is not None:
            found[cell][row] = value
    return found


def _interval(values: list[float]) -> tuple[float | None, float | None]:
    """95 % over rows: Wilson's when every row passed or failed, Student's t otherwise."""
    n = len(values)
    if not n:
        return None, None
    mean = sum(values) / n
    if stats.binary(values):
        z = 1.959963984540054
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)
    found = stats.mean_interval(values)
    assert found is not None
    return found.low, found.high


def cell_report(frame: pl.DataFrame, spec: Spec) -> pl.DataFrame:
    """Per cell: n (answers), rows, ok, each grader's mean over rows with a 95 % interval, cost (the
    judges' apart), cost per correct answer (the first grader's) with its interval, tokens, latency
    p50/p95, and whether it is on the cost–quality Pareto front."""
    if frame.is_empty():
        return frame
    aggs: list[pl.Expr] = [
        pl.len().alias("n"),
        pl.col("row_id").n_unique().alias("rows"),
        (pl.col("status") == "ok").sum().alias("ok"),
        pl.col("answer_usd").sum().alias("cost_usd"),  # what the cell's answers cost, bought now or before
        pl.col("price_usd").sum().alias("spent_usd"),  # what this run paid for them
        (pl.col("prompt_tokens").sum() + pl.col("completion_tokens").sum()).alias("tokens"),
        pl.col("latency_s").quantile(0.5).alias("p50_s"),
        pl.col("latency_s").quantile(0.95).alias("p95_s"),
    ]
    for g in spec.graders:
        aggs.append(pl.col(f"score_{g.name}").sum().alias(f"sum_{g.name}"))  # correct answers bought
        if (
            f"{g.name}_error" in frame.columns
        ):  # answers the grader could not score (a judge's text without one)
            aggs.append(pl.col(f"{g.name}_error").is_not_null().sum().alias(f"{g.name}_unscored"))
        if g.judge:
            aggs.append(pl.col(f"{g.name}_price_usd").sum().alias(f"{g.name}_cost_usd"))
    cells = frame.group_by("cell", maintain_order=True).agg(*aggs)
    names = cells["cell"].to_list()
    for g in spec.graders:
        scored = row_scores(frame, g)
        values = [list(scored.get(cell, {}).values()) for cell in names]
        bounds = [_interval(v) for v in values]
        cells = cells.with_columns(
            pl.Series(f"mean_{g.name}", [sum(v) / len(v) if v else None for v in values], dtype=pl.Float64),
            pl.Series(f"n_{g.name}", [len(v) for v in values], dtype=pl.Int64),
            pl.Series(f"low_{g.name}", [b[0] for b in bounds], dtype=pl.Float64),
            pl.Series(f"high_{g.name}", [b[1] for b in bounds], dtype=pl.Float64),
        )
    first = spec.graders[0].name if spec.graders else None
    if first is not None:
        cells = cells.with_columns(*_cost_per_correct(first))
    return cells.with_columns(pl.Series("pareto", _pareto(cells, first)))


def _cost_per_correct(grader: str) -> list[pl.Expr]:
    """Cost over correct answers, and its interval from the score's: cost / (answers × high) to
    cost / (answers × low), the cost taken as known (none when the low end is 0)."""
    cost = pl.col("cost_usd").cast(pl.Float64)
    per_answer = cost / pl.col("n")
    return [
        pl.when(pl.col(f"sum_{grader}") > 0)
        .then(cost / pl.col(f"sum_{grader}"))
        .otherwise(None)
        .alias("cost_per_correct_usd"),
        pl.when(pl.col(f"high_{grader}") > 0)
        .then(per_answer / pl.col(f"high_{grader}"))
        .otherwise(None)
        .alias("cost_per_correct_low_usd"),
        pl.when(pl.col(f"low_{grader}") > 0)
        .then(per_answer / pl.col(f"low_{grader}"))
        .otherwise(None)
        .alias("cost_per_correct_high_usd"),
    ]


def _pareto(cells: pl.DataFrame, grader: str | None) -> list[bool]:
    """A cell is on the front when no other is at most as dear and at least as good, and better in one."""
    points = [
        (float(c or 0), (s if s is not None else -1.0))
        for c, s in cells.select("cost_usd", f"mean_{grader}" if grader else pl.lit(0.0)).iter_rows()
    ]
    return [
        not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for j, (c2, s2) in enumerate(points) if j != i)
        for i, (c, s) in enumerate(points)
    ]


# ---- paired comparisons ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Cell a against cell b for one grader, on the rows both answered."""

    a: str
    b: str
    grader: str
    rows: int
    difference: float | None  # mean of a - b over the shared rows
    low: float | None
    high: float | None
    test: str  # mcnemar_exact | paired_t | none (fewer than two shared rows)
    p: float | None
    p_holm: float | None
    sd: float | None  # of the per-row differences
    cost_ratio: float | None = None  # a's cost per correct answer over b's

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "sd"}

    def sentence(self) -> str:
        """The comparison as a person reads it."""
        if not self.rows:
            return f"{self.a} and {self.b} share no answered row: no paired comparison ({self.grader})"
        if self.difference is None or self.low is None or self.high is None:
            return f"{self.a} vs {self.b}: {self.rows} shared row(s), too few to compare ({self.grader})"
        points, low, high = self.difference * 100, self.low * 100, self.high * 100
        ratio = _ratio(self.cost_ratio, True)
        significant = self.p_holm is not None and self.p_holm < 1 - stats.CONFIDENCE
        if self.low == self.high == self.difference == 0:  # every shared row scored alike
            return (
                f"{self.a} vs {self.b}: the same score on each of the {self.rows} rows ({self.grader}){ratio}"
            )
        if not significant:
            half = (high - low) / 2
            return (
                f"{self.a} vs {self.b}: no detectable difference on {self.grader} (±{half:.1f} points, "
                f"{self.rows} rows){ratio}"
            )
        if points > 0:
            better, worse, by = self.a, self.b, (points, low, high)
        else:  # b's lead over a: the interval turned round
            better, worse, by = self.b, self.a, (-points, -high, -low)
        return (
            f"{better} beats {worse} on {self.grader} by {by[0]:.1f} points [{by[1]:.1f}, {by[2]:.1f}], "
            f"p = {self.p_holm:.3g} (Holm), {self.rows} rows{_ratio(self.cost_ratio, better == self.a)}"
        )


def _ratio(ratio: float | None, as_given: bool) -> str:
    """', at R × the cost per correct answer' of the cell named first (a's over b's, or turned round)."""
    if not ratio:
        return ""
    return f", at {ratio if as_given else 1 / ratio:.2g} × the cost per correct answer"


def cell_pairs(spec: Spec, present: list[str]) -> list[tuple[str, str]]:
    """The pairs compared: every cell against the spec's baseline, else every two cells that differ
    in one matrix field (of the cells the frame has)."""
    cells = [c for c in spec.cells() if cell_key(c) in present]
    if spec.baseline is not None:
        return [(cell_key(c), spec.baseline) for c in cells if cell_key(c) != spec.baseline]
    return [
        (cell_key(x), cell_key(y))
        for x, y in itertools.combinations(cells, 2)
        if sum(x[k] != y[k] for k in spec.params) == 1
    ]


def compare(frame: pl.DataFrame, spec: Spec, cells: pl.DataFrame | None = None) -> list[Comparison]:
    """Every pair (cell_pairs) for every grader: the paired difference, its test, Holm's adjustment
    over all of them; the cost per correct answer's ratio from `cells` (cell_report) when given."""
    if frame.is_empty() or not spec.graders:
        return []
    present = frame["cell"].unique().to_list()
    cost = {}
    if cells is not None and "cost_per_correct_usd" in cells.columns:
        cost = dict(cells.select("cell", "cost_per_correct_usd").iter_rows())
    found: list[Comparison] = []
    for g in spec.graders:
        scored = row_scores(frame, g)
        for a, b in cell_pairs(spec, present):
            shared = sorted(set(scored.get(a, {})) & set(scored.get(b, {})))
            ratio = cost.get(a) / cost[b] if cost.get(a) and cost.get(b) and g is spec.graders[0] else None
            if len(shared) < 2:
                found.append(
                    Comparison(a, b, g.name, len(shared), None, None, None, "none", None, None, None, ratio)
                )
                continue
            result = stats.paired([scored[a][r] for r in shared], [scored[b][r] for r in shared])
            found.append(
                Comparison(
                    a,
                    b,
                    g.name,
                    result.rows,
                    result.difference,
                    result.low,
                    result.high,
                    result.test,
                    result.p,
                    None,
                    result.sd,
                    ratio,
                )
            )
    adjusted = stats.holm([c.p for c in found])
    return [Comparison(**{**asdict(c), "p_holm": p}) for c, p in zip(found, adjusted, strict=True)]
