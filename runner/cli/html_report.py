"""`runner report RUN --html PATH`: one self-contained page, tables and inline SVG charts.

No script, no stylesheet link, no font or image fetched: the page opens from a file with the network
off. Every text that came from a job, a provider or an error is escaped.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from html import escape
from typing import Any

import polars as pl

from runner.app.compare import Comparison
from runner.app.report import COLUMNS, cells, per_model, top_errors
from runner.core.money import format_usd
from runner.ledger import RunView

WIDTH, BAR_H, PAD = 720, 22, 8
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d2330; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #5b6475; } .cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0; }
.card { border: 1px solid #dde2ea; border-radius: 8px; padding: 10px 14px; min-width: 120px; }
.card b { display: block; font-size: 18px; } .card span { color: #5b6475; font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid #e6e9ef; padding: 5px 7px; text-align: right; white-space: nowrap; }
.scroll { overflow-x: auto; }
th:first-child, td:first-child { text-align: left; } th { background: #f5f7fa; }
td.msg { text-align: left; white-space: normal; }
svg text { font: 11px system-ui, sans-serif; fill: #3b4252; }
"""


def render(run: RunView, df: pl.DataFrame, modes: list[tuple[str, int, int, int]] | None = None) -> str:
    """The page for one run: `run` as Ledger.run gives it, `df` as report.run_frame gives it, `modes`
    as Ledger.by_mode gives them (a batch run's answers by how they were bought)."""
    models = per_model(df)
    errors = top_errors(df, limit=10)
    states = run.states
    cards = [
        ("requests", f"{int(run.total or len(df)):,}"),
        ("ok", f"{states.get('ok', 0):,}"),
        ("failed", f"{states.get('failed', 0):,}"),
        ("possibly billed", f"{states.get('possibly_billed', 0):,}"),
        ("not sent", f"{sum(v for k, v in states.items() if k in ('pending', 'skipped')):,}"),
        ("charged", format_usd(run.spent_nanos, places=6)),
    ]
    if any(mode == "batch" for mode, *_ in modes or []):  # how the answers were bought, and the saving
        for mode, answers, charged, as_calls in modes or []:
            cards.append((f"{mode}: {answers:,} answers", format_usd(charged, places=6)))
            if mode == "batch":
                cards.append(("saved against call prices", format_usd(as_calls - charged, places=6)))
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>runner report {escape(run.id)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Run {escape(run.id)}</h1>",
        f"<div class=meta>{escape(run.job_path)}"
        f" · provider {escape(run.provider)}"
        f" · state <b>{escape(run.state)}</b>"
        + (f" ({escape(run.reason)})" if run.reason else "")
        + f" · started {escape(_when(run.created_at))}</div>",
        "<div class=cards>"
        + "".join(f"<div class=card><b>{escape(v)}</b><span>{escape(k)}</span></div>" for k, v in cards)
        + "</div>",
        "<h2>Per model</h2>",
        _models_table(models),
        "<h2>Cost by model</h2>",
        _bars([(str(r["model"]), _dec(r["charged_usd"])) for r in _rows(models)]),
        "<h2>Latency distribution (successful requests)</h2>",
        _histogram(_latencies(df)),
        "<h2>Spend over time</h2>",
        _spend_line(df),
        "<h2>Top errors</h2>",
        _errors_table(errors),
        "</body></html>",
    ]
    return "\n".join(parts)


# ---- tables ---------------------------------------------------------------------------------------


def _models_table(models: pl.DataFrame) -> str:
    rows = ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells(r)) + "</tr>" for r in _rows(models)]
    if not rows:
        return "<p class=meta>No requests.</p>"
    header = "".join(f"<th>{escape(h)}</th>" for h in COLUMNS)
    return f"<div class=scroll><table><tr>{header}</tr>{''.join(rows)}</table></div>"


def _errors_table(errors: pl.DataFrame) -> str:
    if errors.is_empty():
        return "<p class=meta>No errors.</p>"
    rows = "".join(
        f"<tr><td>{escape(str(r['error_type']))}</td><td>{r['count']:,}</td>"
        f"<td class=msg>{escape(str(r['example'] or ''))[:300]}</td></tr>"
        for r in errors.iter_rows(named=True)
    )
    return f"<table><tr><th>error</th><th>requests</th><th>example</th></tr>{rows}</table>"


# ---- charts (inline SVG) --------------------------------------------------------------------------


def _bars(items: list[tuple[str, Decimal]]) -> str:
    if not items or not any(v > 0 for _, v in items):
        return "<p class=meta>Nothing charged.</p>"
    label_w, top = 230, max(v for _, v in items)
    height = len(items) * (BAR_H + PAD) + PAD
    body = []
    for i, (label, value) in enumerate(items):
        y = PAD + i * (BAR_H + PAD)
        w = 0 if top == 0 else float(value / top) * (WIDTH - label_w - 110)
        body.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{BAR_H}" fill="#4c72b0" rx="3"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{escape(format_usd(value, places=6))}</text>'
        )
    return _svg(height, "".join(body), "cost by model")


def _histogram(values: list[float], bins: int = 24) -> str:
    if not values:
        return "<p class=meta>No successful requests.</p>"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - low) / span * bins))] += 1
    left, bottom, plot_h = 40, 170, 150
    bar_w = (WIDTH - left - 10) / bins
    peak = max(counts)
    body = [f'<line x1="{left}" y1="{bottom}" x2="{WIDTH - 10}" y2="{bottom}" stroke="#8a93a6"/>']
    for i, n in enumerate(counts):
        h = n / peak * plot_h
        x = left + i * bar_w
        body.append(
            f'<rect x="{x + 1:.1f}" y="{bottom - h:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}"'
            f' fill="#55a868"><title>{n} requests</title></rect>'
        )
    body.append(f'<text x="{left}" y="{bottom + 16}">{low:.3f} s</text>')
    body.append(f'<text x="{WIDTH - 10}" y="{bottom + 16}" text-anchor="end">{high:.3f} s</text>')
    body.append(f'<text x="{left - 4}" y="{bottom - plot_h + 4}" text-anchor="end">{peak}</text>')
    return _svg(bottom + 24, "".join(body), "latency distribution")


def _spend_line(df: pl.DataFrame) -> str:
    if df.is_empty():
        return "<p class=meta>Nothing charged.</p>"
    charged = (
        df.filter(pl.col("price_usd").is_not_null() & pl.col("finished_at").is_not_null())
        .sort("finished_at")
        .select("finished_at", "price_usd")
    )
    if charged.is_empty():
        return "<p class=meta>Nothing charged.</p>"
    times = charged["finished_at"].to_list()
    total, points = Decimal(0), []
    for when, price in zip(times, charged["price_usd"].to_list(), strict=True):
        total += price
        points.append((when, total))
    points = _thin(points, 400)
    start, end = times[0], times[-1]
    seconds = (end - start).total_seconds()
    left, bottom, plot_h, right = 70, 170, 150, WIDTH - 10
    if seconds >= 1:  # by the clock
        xs = [(t - start).total_seconds() / seconds for t, _ in points]
        axis = (_when(start), f"{_when(end)} (+{seconds:,.0f} s)")
    else:  # a run shorter than a second: by completion order
        xs = [i / max(1, len(points) - 1) for i in range(len(points))]
        axis = ("first request", f"last request (the run took {seconds:.2f} s)")
    xy = " ".join(
        f"{left + x * (right - left):.1f},{bottom - float(v / total) * plot_h:.1f}"
        for x, (_, v) in zip(xs, points, strict=True)
    )
    body = (
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#8a93a6"/>'
        f'<polyline points="{left},{bottom} {xy}" fill="none" stroke="#c44e52" stroke-width="2"/>'
        f'<text x="{left - 4}" y="{bottom - plot_h + 4}" text-anchor="end">'
        f"{escape(format_usd(total, places=6))}</text>"
        f'<text x="{left - 4}" y="{bottom}" text-anchor="end">$0</text>'
        f'<text x="{left}" y="{bottom + 16}">{escape(axis[0])}</text>'
        f'<text x="{right}" y="{bottom + 16}" text-anchor="end">{escape(axis[1])}</text>'
    )
    return _svg(bottom + 24, body, "spend over time")


def _svg(height: int, body: str, label: str) -> str:
    return (
        f'<svg width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{label}">{body}</svg>'
    )


# ---- small helpers --------------------------------------------------------------------------------


def _rows(df: pl.DataFrame) -> list[dict[str, Any]]:
    return list(df.iter_rows(named=True)) if len(df) else []


def _latencies(df: pl.DataFrame) -> list[float]:
    if df.is_empty():
        return []
    ok = df.filter((pl.col("status") == "ok") & pl.col("latency_s").is_not_null())
    return [float(v) for v in ok["latency_s"].to_list()]


def _thin(points: list[Any], most: int) -> list[Any]:
    """At most `most` points, the last one always kept (a chart needs no more)."""
    if len(points) <= most:
        return points
    step = len(points) / most
    return [points[int(i * step)] for i in range(most)] + [points[-1]]


def _dec(value: Any) -> Decimal:
    return Decimal(0) if value is None else Decimal(value)


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if value is None else str(value)


def render_sweep(
    title: str,
    cells_frame: pl.DataFrame,
    columns: list[str],
    rows: list[list[str]],
    grader: str,
    comparisons: list[Comparison] | None = None,
) -> str:
    """A sweep's page: the cells' cost against their mean score (the Pareto front in red), the
    per-cell table (`columns` and `rows` as the terminal shows them), and the paired comparisons with
    a forest plot of their differences."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    compared = comparisons or []
    pairs = "".join(f"<li>{escape(c.sentence())}</li>" for c in compared)
    return "".join(
        [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            f"<title>runner sweep {escape(title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>Sweep {escape(title)}</h1>",
            f"<h2>cost against score ({escape(grader)})</h2>",
            _scatter(cells_frame, grader),
            "<h2>cells</h2>",
            f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>",
            "<h2>paired comparisons (a - b, points, 95% CI; p adjusted by Holm)</h2>" if compared else "",
            _forest(compared) if compared else "",
            f"<ul>{pairs}</ul>" if compared else "",
            "</body></html>",
        ]
    )


def _forest(comparisons: list[Comparison]) -> str:
    """Each pair's paired difference with its interval on one axis through 0 (red: Holm p < 0.05)."""
    shown = [c for c in comparisons if c.difference is not None and c.low is not None and c.high is not None]
    if not shown:
        return "<p class=meta>No pair of cells shares rows to compare.</p>"
    reach = max(max(abs(c.low or 0), abs(c.high or 0)) for c in shown) or 0.01
    label_w, row_h = 330, 24
    span = WIDTH - label_w - 30
    zero = label_w + span / 2
    height = len(shown) * row_h + 40

    def x(value: float) -> float:
        return zero + value / reach * span / 2

    body = [
        (
            f'<line x1="{zero:.1f}" y1="6" x2="{zero:.1f}" y2="{height - 24}" stroke="#999" '
            'stroke-dasharray="3 3"/>'
        ),
        f'<text x="{label_w}" y="{height - 8}">{-reach * 100:+.1f}</text>',
        f'<text x="{zero:.1f}" y="{height - 8}" text-anchor="middle">0</text>',
        f'<text x="{WIDTH - 30}" y="{height - 8}" text-anchor="end">{reach * 100:+.1f} points</text>',
    ]
    for i, c in enumerate(shown):
        y = 16 + i * row_h
        colour = "#c0392b" if c.p_holm is not None and c.p_holm < 0.05 else "#4c72b0"
        label = f"{c.a} − {c.b} ({c.grader})"
        body.append(
            f'<text x="{label_w - 8}" y="{y + 4}" text-anchor="end">{escape(label[:60])}</text>'
            f'<line x1="{x(c.low or 0):.1f}" y1="{y}" x2="{x(c.high or 0):.1f}" y2="{y}" stroke="{colour}" '
            'stroke-width="2"/>'
            f'<circle cx="{x(c.difference or 0):.1f}" cy="{y}" r="4" fill="{colour}">'
            f"<title>{escape(c.sentence())}</title></circle>"
        )
    return _svg(height, "".join(body), "paired differences between cells")


def _scatter(cells_frame: pl.DataFrame, grader: str) -> str:
    column = f"mean_{grader}"
    if cells_frame.is_empty() or column not in cells_frame.columns:
        return "<p class=meta>No scores to plot.</p>"
    points = [
        (str(r["cell"]), float(r["cost_usd"] or 0), r[column], bool(r["pareto"])) for r in _rows(cells_frame)
    ]
    top = max((c for _, c, _, _ in points), default=0.0) or 1.0
    left, bottom, height = 60, 260, 290
    body = [
        f'<line x1="{left}" y1="{bottom}" x2="{WIDTH - 20}" y2="{bottom}" stroke="#999"/>',
        f'<line x1="{left}" y1="20" x2="{left}" y2="{bottom}" stroke="#999"/>',
        f'<text x="{left}" y="{bottom + 16}">$0</text>',
        f'<text x="{WIDTH - 20}" y="{bottom + 16}" text-anchor="end">{escape(_top_label(top))}</text>',
        f'<text x="{left - 6}" y="24" text-anchor="end">1</text>',
        f'<text x="{left - 6}" y="{bottom}" text-anchor="end">0</text>',
    ]
    for label, cost, score, front in points:
        x = left + cost / top * (WIDTH - left - 40)
        y = bottom - (score or 0.0) * (bottom - 20)
        colour = "#c0392b" if front else "#4c72b0"
        body.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"><title>{escape(label)}</title></circle>'
        )
    return _svg(height, "".join(body), "cost against score per cell")


def _top_label(top: float) -> str:
    return format_usd(Decimal(str(top)), places=6)
