"""Pay once: answers kept in the ledger are not bought again (the response cache)."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
from typer.testing import CliRunner

from runner.cli.main import app
from runner.core.money import to_nanos
from runner.ledger import Ledger
from tests.conftest import SimulatorThread

cli = CliRunner()
DEMO = Path(__file__).resolve().parents[1] / "jobs" / "demo.jsonl"


def calls(sim: SimulatorThread) -> int:
    return int(sim.books.stats()["counters"].get("run.call", 0))


def run(sim: SimulatorThread, job: Path, out: Path, *args: str) -> Any:
    command = ["run", str(job), "--provider", "orthogonal", "--base-url", sim.base_url, "--max-usd", "1"]
    return cli.invoke(
        app, [*command, "-o", str(out), *args], env={"ORTHOGONAL_API_KEY": "k", "COLUMNS": "200"}
    )


def test_the_demo_run_again_with_new_is_answered_from_the_cache_at_no_cost(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    first = run(sim, DEMO, tmp_path / "a.parquet")
    assert first.exit_code == 0, first.output
    paid = sim.books.charged_nanos
    assert calls(sim) == 22 and paid > 0

    second = run(sim, DEMO, tmp_path / "b.parquet", "--new")
    assert second.exit_code == 0, second.output
    assert calls(sim) == 22  # nothing sent
    assert sim.books.charged_nanos == paid
    runs = Ledger().runs()
    assert runs[0].spent_nanos == 0 and runs[0].states == {"ok": 22}
    saved = f"${Decimal(paid) / 10**9:.6f} saved"
    assert "22 request(s) answered from the cache" in second.output and saved in second.output
    frame = pl.read_parquet(tmp_path / "b.parquet")
    bought = pl.read_parquet(tmp_path / "a.parquet")
    assert frame["cached"].to_list() == [True] * 22 and not any(bought["cached"].to_list())
    assert frame["price_usd"].sum() == 0
    assert frame["content"].to_list() == bought["content"].to_list()  # the answers, as first bought
    assert frame["completion_tokens"].to_list() == bought["completion_tokens"].to_list()

    refreshed = run(sim, DEMO, tmp_path / "c.parquet", "--new", "--cache", "refresh")
    assert refreshed.exit_code == 0, refreshed.output
    assert calls(sim) == 44  # bought again
    assert not any(pl.read_parquet(tmp_path / "c.parquet")["cached"].to_list())


def test_the_estimate_counts_only_what_will_be_sent(sim: SimulatorThread, tmp_path: Path) -> None:
    assert run(sim, DEMO, tmp_path / "a.parquet").exit_code == 0
    env = {"ORTHOGONAL_API_KEY": "k"}
    base = ["estimate", str(DEMO), "--provider", "orthogonal", "--base-url", sim.base_url, "--json"]
    cached = json.loads(cli.invoke(app, base, env=env).stdout)
    assert cached["from_cache"] == 22 and cached["total_usd"] == "0.000000000"
    assert Decimal(cached["saved_usd"]) * 10**9 == sim.books.charged_nanos
    fresh = json.loads(cli.invoke(app, [*base, "--cache", "refresh"], env=env).stdout)
    assert fresh["from_cache"] == 0 and Decimal(fresh["total_usd"]) > 0


def test_identical_lines_are_bought_once_unless_marked_as_samples(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    body = {"model": "openai/gpt-oss-120b", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    lines = [{**body, "custom_id": f"same{i}"} for i in range(3)]
    lines += [{**body, "custom_id": f"sample{i}", "metadata": {"sample": i}} for i in range(4)]
    job = write_job(lines)
    done = run(sim, job, tmp_path / "a.parquet")
    assert done.exit_code == 0, done.output
    assert calls(sim) == 5  # the three identical lines once, each of the four samples
    frame = pl.read_parquet(tmp_path / "a.parquet").sort("line")
    assert frame["status"].to_list() == ["ok"] * 7
    assert frame["cached"].to_list() == [False, True, True, False, False, False, False]
    assert frame["content"][1] == frame["content"][0] == frame["content"][2]
    assert frame["price_usd"][1] == 0 and frame["price_usd"][0] > 0
    view = Ledger().runs()[0]
    assert view.spent_nanos == sim.books.charged_nanos  # each answer paid once

    again = run(sim, job, tmp_path / "b.parquet", "--new")  # each sample has its own answer kept
    assert again.exit_code == 0 and calls(sim) == 5
    reused = pl.read_parquet(tmp_path / "b.parquet").sort("line")
    assert reused["content"].to_list() == frame["content"].to_list()

    off = run(sim, job, tmp_path / "c.parquet", "--new", "--cache", "off")
    assert off.exit_code == 0 and calls(sim) == 12  # every line as written
    bad = run(sim, job, tmp_path / "d.parquet", "--new", "--cache", "sometimes")
    assert bad.exit_code == 2 and "--cache must be one of reuse, refresh, off" in bad.output
    assert calls(sim) == 12


def test_a_cached_run_needs_no_budget_for_what_it_does_not_send(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    lines = [
        {
            "custom_id": f"c{i}",
            "model": "openai/gpt-oss-120b",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": f"question {i}"}],
        }
        for i in range(10)
    ]
    job = write_job(lines)
    assert run(sim, job, tmp_path / "a.parquet").exit_code == 0
    bigger = write_job(
        [*lines, {**lines[0], "custom_id": "new", "messages": [{"role": "user", "content": "?"}]}]
    )
    ledger = Ledger()
    ledger.create_budget("tiny", to_nanos(Decimal("0.0002")))  # one request's quote, not eleven
    env = {"ORTHOGONAL_API_KEY": "k"}
    command = ["run", str(bigger), "--provider", "orthogonal", "--base-url", sim.base_url, "--budget", "tiny"]
    done = cli.invoke(app, [*command, "-o", str(tmp_path / "b.parquet")], env=env)
    assert done.exit_code == 0, done.output
    assert calls(sim) == 11
    assert pl.read_parquet(tmp_path / "b.parquet")["cached"].sum() == 10


def test_reconcile_names_a_request_the_books_disagree_on_and_exits_6(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    assert run(sim, DEMO, tmp_path / "a.parquet").exit_code == 0
    env = {"ORTHOGONAL_API_KEY": "k", "COLUMNS": "200"}
    agree = cli.invoke(app, ["reconcile"], env=env)
    assert agree.exit_code == 0, agree.output
    assert "22 request(s) agree" in agree.output and "+0 nano-USD" in agree.output
    ledger = Ledger()
    with ledger.transaction() as tx:  # the ledger off by 7 nano-USD on one request
        tx.conn.execute("UPDATE requests SET price_nanos = price_nanos + 7 WHERE custom_id = 'explain-2'")
    differs = cli.invoke(app, ["reconcile", "--json"], env=env)
    assert differs.exit_code == 6, differs.output
    report = json.loads(differs.stdout)
    assert report["difference_nanos"] == -7 and report["agrees"] is False
    assert [m["custom_id"] for m in report["mismatched"]] == ["explain-2"]


def test_reconcile_a_budget_sums_its_runs_against_the_providers_books(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    env = {"ORTHOGONAL_API_KEY": "k", "COLUMNS": "200"}
    assert cli.invoke(app, ["budget", "create", "team", "--limit", "1"]).exit_code == 0
    other = write_job([{"model": "openai/gpt-oss-120b", "messages": [{"role": "user", "content": "x"}]}])
    for job in (DEMO, other):
        command = [
            "run",
            str(job),
            "--provider",
            "orthogonal",
            "--base-url",
            sim.base_url,
            "--budget",
            "team",
        ]
        assert (
            cli.invoke(app, [*command, "-o", str(tmp_path / f"{job.stem}.parquet")], env=env).exit_code == 0
        )
    agree = cli.invoke(app, ["reconcile", "--budget", "team", "--json"], env=env)
    assert agree.exit_code == 0, agree.output
    report = json.loads(agree.stdout)
    assert len(report["runs"]) == 2 and report["difference_nanos"] == 0 and report["agrees"] is True
    assert Decimal(report["provider_usd"]) * 10**9 == sim.books.charged_nanos
    with Ledger().transaction() as tx:  # the budget's own figure off by 5 nano-USD
        tx.conn.execute("UPDATE budgets SET spent_nanos = spent_nanos + 5 WHERE name = 'team'")
    differs = cli.invoke(app, ["reconcile", "--budget", "team"], env=env)
    assert differs.exit_code == 6, differs.output
    assert "budget 'team', 2 run(s)" in differs.output and "-5 nano-USD" in differs.output
    both = cli.invoke(app, ["reconcile", "abc", "--budget", "team"], env=env)
    assert both.exit_code == 2 and "not both" in both.output
