"""The expected cost beside the bound: learned from what a model's answers used of their bound in this
ledger, and `--admit expected`, which starts a job whose bound does not fit while every request is
still held at its bound."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
from typer.testing import CliRunner

from runner.cli.main import app
from runner.ledger import Ledger

cli = CliRunner()


def lines(prefix: str, n: int = 200) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "model": "openai/gpt-oss-120b",
            "max_tokens": 120,
            "messages": [{"role": "user", "content": f"{prefix}: tell me about item number {i}"}],
        }
        for i in range(n)
    ]


def estimate(job: Path) -> dict[str, Any]:
    shown = cli.invoke(app, ["estimate", str(job), "--provider", "simulator", "--json"])
    assert shown.exit_code == 0, shown.output
    result: dict[str, Any] = json.loads(shown.stdout)
    return result


def test_after_one_run_a_job_of_the_same_shape_is_expected_within_a_quarter(
    write_job: Any, tmp_path: Path
) -> None:
    first, second = write_job(lines("a"), "a.jsonl"), write_job(lines("b"), "b.jsonl")
    before = estimate(second)
    assert before["expected_default"] == ["openai/gpt-oss-120b"]  # nothing seen yet: half the bound, said
    assert Decimal(before["expected_usd"]) < Decimal(before["total_usd"])
    ran = cli.invoke(
        app,
        ["run", str(first), "--provider", "simulator", "--max-usd", "1", "-o", str(tmp_path / "a.parquet")],
    )
    assert ran.exit_code == 0, ran.output
    after = estimate(second)
    assert after["expected_default"] == []
    out = tmp_path / "b.parquet"
    ran = cli.invoke(app, ["run", str(second), "--provider", "simulator", "--max-usd", "1", "-o", str(out)])
    assert ran.exit_code == 0, ran.output
    cost = Decimal(pl.read_parquet(out)["price_usd"].sum())
    expected = Decimal(after["expected_usd"])
    assert abs(expected - cost) <= cost / 4, (expected, cost)
    assert cost < Decimal(after["total_usd"])  # the bound held, the expected near what it cost
    assert "expected" in ran.output  # the run's quote table shows both figures


def test_admit_expected_runs_a_job_whose_bound_does_not_fit_and_never_overspends(
    write_job: Any, tmp_path: Path
) -> None:
    cli.invoke(
        app,
        ["run", str(write_job(lines("warm", 50), "warm.jsonl")), "--provider", "simulator", "--max-usd", "1"],
    )
    job = write_job(lines("c"), "c.jsonl")
    seen = estimate(job)
    bound, expected = Decimal(seen["total_usd"]), Decimal(seen["expected_usd"])
    budget = (expected * Decimal("1.3")).quantize(Decimal("0.000001"))
    assert expected < budget < bound
    args = [
        "run",
        str(job),
        "--provider",
        "simulator",
        "--max-usd",
        str(budget),
        "-o",
        str(tmp_path / "c.parquet"),
    ]
    refused = cli.invoke(app, args)
    assert refused.exit_code == 3 and "does not fit" in refused.output  # by default, the bound must fit
    admitted = cli.invoke(app, [*args, "--admit", "expected"])
    assert admitted.exit_code in (0, 4), admitted.output
    run = Ledger().runs()[0]
    view = Ledger().budget_by_id(run.budget_id)
    assert view.spent_nanos + view.reserved_nanos + view.possibly_billed_nanos <= view.limit_nanos
    if admitted.exit_code == 4:  # the money ran out before the end: stopped cleanly, resumable
        assert "budget reached" in admitted.output and "resumable" in admitted.output
    else:
        assert run.states == {"ok": 200}
    too_little = cli.invoke(
        app, [*args[:-4], "--max-usd", str(expected / 2), "--admit", "expected", "--new", "--cache", "off"]
    )
    assert too_little.exit_code == 3 and "the expected cost" in too_little.output
