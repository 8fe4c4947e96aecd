"""The progress display: phases, counts, money and ETA, and plain lines when not on a terminal."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path

import pytest

from runner.cli import console as cli
from runner.cli import progress as progress_line
from runner.core.events import Funds, Phase, Quoted, RequestFinished
from runner.core.money import to_nanos


def test_status_shows_counts_rate_money_and_the_budget() -> None:
    progress = progress_line.Progress("quoting", 10)
    assert progress.bar is None  # pytest's stderr is not a terminal
    for i in range(10):
        progress(Quoted(f"q{i}", cached=False, known=True))
    assert progress.done == 10

    progress(Phase("running", 8))  # a new phase starts its counts afresh
    assert (progress.label, progress.total, progress.done) == ("running", 8, 0)
    progress(Funds(to_nanos(Decimal(1)), to_nanos(Decimal(2)), 0, to_nanos(Decimal(7))))
    for state in ("ok", "ok", "ok", "failed"):
        progress(RequestFinished("x", state, to_nanos(Decimal("0.5")) if state == "ok" else 0))
    status = progress.status(progress.started + 2.0)
    assert status.split(" · ") == [
        "1 failed",
        "2.0/s",
        "$1.5000 spent",
        "$45.0000/min",
        "$2.0000 reserved",
        "$7.0000 left in the budget",
    ]


def test_a_slow_rate_shows_a_decimal_and_a_fast_one_none() -> None:
    progress = progress_line.Progress("running", 100)
    progress(RequestFinished("x", "ok", 0))
    assert " · 0.4/s" in progress.status(progress.started + 2.5)  # 1 in 2.5 s: not "0/s"
    for _ in range(99):
        progress(RequestFinished("x", "ok", 0))
    assert " · 40/s" in progress.status(progress.started + 2.5)


def test_plain_lines_every_few_seconds_with_an_eta(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress_line.time, "monotonic", lambda: clock[0])
    progress = progress_line.Progress("running", 100)
    progress(RequestFinished("a", "ok", 0))
    assert capsys.readouterr().err == ""  # not yet: one line every LINE_EVERY_S
    clock[0] += progress.LINE_EVERY_S
    for _ in range(19):
        progress(RequestFinished("a", "ok", 0))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("running: 2/100 · 0 failed")
    clock[0] += progress.LINE_EVERY_S
    progress(RequestFinished("a", "ok", 0))
    line = capsys.readouterr().err.strip()
    assert line.startswith("running: 21/100")
    assert line.endswith("ETA 38 s")  # 79 left at 21 per 10 s


def test_the_bar_is_updated_ten_times_a_second_not_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress_line.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress_line, "err", cli.Console(file=io.StringIO(), force_terminal=True))
    progress = progress_line.Progress("running", 1000)
    assert progress.bar is not None
    shown: list[int] = []
    monkeypatch.setattr(progress.bar, "update", lambda _task, completed, info: shown.append(completed))
    for i in range(999):
        clock[0] += 0.001  # a thousand requests a second
        progress(RequestFinished(f"r{i}", "ok", 0))
    assert 9 <= len(shown) <= 11
    progress(RequestFinished("last", "ok", 0))
    assert shown[-1] == 1000  # the end is always shown


def test_at_80_columns_the_progress_line_keeps_done_total_failed_spent_and_eta() -> None:
    from rich.console import Console  # noqa: PLC0415

    terminal = Console(width=80, force_terminal=True, file=io.StringIO(), record=True)
    progress = progress_line.Progress("running", 20_000, console=terminal)
    assert progress.bar is not None
    progress(Funds(0, to_nanos(Decimal(3)), 0, to_nanos(Decimal(40)), stalled=2))
    for i in range(1_000):
        progress(RequestFinished("r", "ok" if i % 100 else "failed", to_nanos(Decimal("0.0123"))))
    progress.last_line = 0.0
    progress._show()
    screen = Console(width=80, file=io.StringIO(), record=True, force_terminal=True)
    screen.print(progress.bar.get_renderable())
    line = screen.export_text().strip()
    assert "1000/20000" in line
    assert "10 failed" in line and "2 stalled" in line and "$12.3000 spent" in line
    assert line.rstrip().endswith(("-:--:--", "0:00:00")) or ":" in line.split()[-1]  # the ETA column
    assert "…" not in line and len(line) <= 80


def test_at_80_columns_the_report_is_a_block_per_model_with_every_figure(tmp_path: Path) -> None:
    from rich.console import Console  # noqa: PLC0415
    from typer.testing import CliRunner  # noqa: PLC0415

    from runner.cli.main import app  # noqa: PLC0415
    from runner.ledger import Ledger  # noqa: PLC0415

    demo = Path(__file__).resolve().parent.parent / "jobs" / "demo.jsonl"
    result = CliRunner().invoke(
        app,
        ["run", str(demo), "--provider", "simulator", "--max-usd", "1", "-o", str(tmp_path / "d.parquet")],
    )
    assert result.exit_code == 0, result.output
    run_id = Ledger().runs()[0].id
    terminal = Console(width=80, file=io.StringIO(), record=True)
    cli.print_report(Ledger(), run_id, console=terminal)
    text = terminal.export_text()
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    for model in ("openai/gpt-oss-120b", "zai-org/GLM-4.6", "moonshotai/Kimi-K2.5"):
        assert model in text
    assert text.count("  ok ") == 6 and text.count("charged $") == 6 and text.count("latency p50") == 6
