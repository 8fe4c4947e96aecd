"""How a sweep is shown: the cost matrix before spending, and the per-cell comparison after, as
columns and rows of text (the CLI makes the terminal's tables of them, the HTML page its table) and
as plain values for --json. Builds; the CLI prints."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import polars as pl

from runner.app.compare import Comparison
from runner.app.sweep import Spec
from runner.app.sweep_run import SweepPlan
from runner.core.errors import printable
from runner.core.money import format_usd, from_nanos, to_nanos


def _money(nanos: int) -> str:
    return format_usd(nanos, places=6)


MATRIX_COLUMNS = ["cell", "requests", "cached", "quoted", "expected", "judges", "per-cell budget"]


def matrix_rows(plan: SweepPlan, remaining_nanos: int | None) -> list[list[str]]:
    """One row per cell: requests, from the cache, quoted cost, the judges' cost, and the verdict."""
    limit = plan.spec.per_cell_usd
    rows = []
    for cell in plan.cells.values():
        verdict = "–" if limit is None else ("fits" if cell.nanos <= to_nanos(limit) else "over")
        counts = [f"{cell.requests:,}", f"{cell.cached:,}"]
        quoted = _money(cell.nanos) + (f" + unknown for {cell.unknown}" if cell.unknown else "")
        expected = _money(cell.expected_nanos)
        rows.append([printable(cell.key), *counts, quoted, expected, _money(cell.judge_nanos), verdict])
    rows.append(
        ["total", "", "", _money(plan.nanos), _money(plan.expected_nanos), _money(plan.judge_nanos), ""]
    )
    if remaining_nanos is not None:
        rows.append(["budget remaining", "", "", _money(remaining_nanos), "", "", ""])
    return rows


def matrix_json(plan: SweepPlan, remaining_nanos: int | None) -> dict[str, Any]:
    limit = plan.spec.per_cell_usd
    return {
        "rows": plan.rows_total,
        "requests": plan.expansion.requests,
        "job": str(plan.expansion.job),
        "cells": [
            {
                "cell": c.key,
                "params": c.params,
                "requests": c.requests,
                "cached": c.cached,
                "quoted_usd": f"{from_nanos(c.nanos):f}",
                "expected_usd": f"{from_nanos(c.expected_nanos):f}",
                "unquoted": c.unknown,
                "judges_usd": f"{from_nanos(c.judge_nanos):f}",
                "fits": None if limit is None else c.nanos <= to_nanos(limit),
            }
            for c in plan.cells.values()
        ],
        "quoted_usd": f"{from_nanos(plan.nanos):f}",
        "expected_usd": f"{from_nanos(plan.expected_nanos):f}",
        "judges_usd": f"{from_nanos(plan.judge_nanos):f}",
        "budget_remaining_usd": None if remaining_nanos is None else f"{from_nanos(remaining_nanos):f}",
    }


def report_columns(spec: Spec) -> list[str]:
    columns = ["cell", "n", "ok"]
    columns += [f"{g.name} (95% CI)" for g in spec.graders]
    columns += [
        "cost",
        *(f"{g.name} cost" for g in spec.graders if g.judge),
        "$/correct",
        "tokens",
        "p50 s",
        "p95 s",
        "front",
    ]
    return columns


def report_rows(cells: pl.DataFrame, spec: Spec) -> list[list[str]]:
    rows = []
    for r in cells.iter_rows(named=True):
        row = [printable(str(r["cell"])), f"{r['n']:,}", f"{r['ok']:,}"]
        for g in spec.graders:
            mean, low, high = r[f"mean_{g.name}"], r[f"low_{g.name}"], r[f"high_{g.name}"]
            row.append("–" if mean is None else f"{mean:.2f} [{low:.2f}, {high:.2f}]")
        row.append(_usd(r["cost_usd"]))
        row += [_usd(r[f"{g.name}_cost_usd"]) for g in spec.graders if g.judge]
        per, low, high = (r.get(f"cost_per_correct{x}_usd") for x in ("", "_low", "_high"))
        span = f" [{_dollars(low)}, {_dollars(high)}]" if per is not None else ""
        row.append("–" if per is None else f"{_dollars(per)}{span}")
        row.append(f"{int(r['tokens'] or 0):,}")
        row += ["–" if r[k] is None else f"{r[k]:.3f}" for k in ("p50_s", "p95_s")]
        row.append("yes" if r["pareto"] else "")
        rows.append(row)
    return rows


def report_json(cells: pl.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: (f"{v:f}" if isinstance(v, Decimal) else v) for k, v in r.items()}
        for r in cells.iter_rows(named=True)
    ]


def _usd(value: Any) -> str:
    return format_usd(Decimal(0) if value is None else Decimal(value), places=6)


def _dollars(value: float | None) -> str:
    return "∞" if value is None else f"${value:.6f}"


COMPARISON_COLUMNS = [
    "a",
    "b",
    "grader",
    "rows",
    "a - b (points, 95% CI)",
    "test",
    "p (Holm)",
    "verdict",
    "a/b $ per correct",
]


def comparison_rows(comparisons: list[Comparison]) -> list[list[str]]:
    """One row per pair and grader: the paired difference in points with its interval, the test, the
    Holm-adjusted p-value and the verdict."""
    rows = []
    for c in comparisons:
        if c.difference is None or c.low is None or c.high is None:
            shown, verdict = "–", "no shared rows" if not c.rows else "too few rows"
        else:
            shown = f"{c.difference * 100:+.1f} [{c.low * 100:+.1f}, {c.high * 100:+.1f}]"
            significant = c.p_holm is not None and c.p_holm < 0.05
            verdict = (
                ("a better" if c.difference > 0 else "b better")
                if significant
                else "no detectable difference"
            )
        p = "–" if c.p_holm is None else f"{c.p_holm:.3g}"
        ratio = "–" if c.cost_ratio is None else f"{c.cost_ratio:.2f} ×"
        rows.append(
            [printable(c.a), printable(c.b), c.grader, f"{c.rows:,}", shown, c.test, p, verdict, ratio]
        )
    return rows


def comparisons_json(comparisons: list[Comparison]) -> list[dict[str, Any]]:
    return [c.as_json() for c in comparisons]
