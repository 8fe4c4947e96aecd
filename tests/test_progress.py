"""The progress display: phases, counts, money and ETA, and plain lines when not on a terminal."""

from __future__ import annotations

import io
from decimal import Decimal

import pytest

from runner import console as cli
from runner.events import Funds, Phase, Quoted, RequestFinished
from runner.money import to_nanos


def test_status_shows_counts_rate_money_and_the_budget() -> None:
    progress = cli.Progress("quoting", 10)
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
        "2/s",
        "$1.5000 spent",
        "$45.0000/min",
        "$2.0000 reserved",
        "$7.0000 left in the budget",
    ]


def test_plain_lines_every_few_seconds_with_an_eta(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    progress = cli.Progress("running", 100)
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
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(cli, "err", cli.Console(file=io.StringIO(), force_terminal=True))
    progress = cli.Progress("running", 1000)
    assert progress.bar is not None
    shown: list[int] = []
    monkeypatch.setattr(progress.bar, "update", lambda _task, completed, info: shown.append(completed))
    for i in range(999):
        clock[0] += 0.001  # a thousand requests a second
        progress(RequestFinished(f"r{i}", "ok", 0))
    assert 9 <= len(shown) <= 11
    progress(RequestFinished("last", "ok", 0))
    assert shown[-1] == 1000  # the end is always shown
