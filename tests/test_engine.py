"""Estimate and run against the real loopback simulator: money, resume, faults, Parquet."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from openai.types.chat import ChatCompletion
from typer.testing import CliRunner

import runner
from runner.app.export import export_jsonl, export_parquet, lazy_run, schema
from runner.app.report import REPORT_NEEDS, per_model, run_frame, summarize, top_errors
from runner.app.run import RunResult, run_job
from runner.cli.main import app
from runner.core.config import RunConfig, Timeouts
from runner.core.errors import BudgetExceeded, JobChanged, LedgerError, LedgerUnavailable, RunBusy, Unpriced
from runner.core.jobs import iter_requests, validate_job
from runner.core.models import Quote
from runner.core.money import format_usd, from_nanos, to_nanos
from runner.ledger import Ledger
from runner.ledger.db import time_text, utcnow
from runner.providers.orthogonal import OrthogonalProvider
from runner.providers.registry import Connection
from runner.simulator import SimulatorThread

cli = CliRunner()


def job_lines(n: int, prefix: str = "q", max_tokens: int = 50) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "model": "openai/gpt-oss-120b",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"question {prefix} {i}"}],
            "metadata": {"i": i},
        }
        for i in range(n)
    ]


async def run(sim: SimulatorThread, job: Path, ledger: Ledger, **kw: Any) -> Any:
    provider = OrthogonalProvider(api_key="k", base_url=sim.base_url, timeouts=Timeouts(1.0, 1.0))
    try:
        budget = kw.pop("budget", None)
        max_usd = kw.pop("max_usd", Decimal("1") if budget is None else None)
        summary = kw.pop("summary", None)
        config = RunConfig(job=job, budget=budget, max_usd=max_usd, **{"concurrency": 8, **kw})
        return await run_job(config, conn=Connection(provider, "sim"), ledger=ledger, summary=summary)
    finally:
        await provider.aclose()


async def test_a_job_changed_after_validation_is_refused_before_any_send(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    """The quote pass makes rows from lines it does not check again: it compares the file's digest
    with validation's, and a file changed in between leaves no run and sends nothing."""
    ledger = Ledger()
    job = write_job(job_lines(30))
    summary = validate_job(job)
    text = job.read_text().replace('"max_tokens": 50', '"max_tokens": -1', 1)  # now invalid
    job.write_text(text)
    with pytest.raises(JobChanged, match="changed while the run was being prepared"):
        await run(sim, job, ledger, summary=summary)
    assert ledger.runs() == []
    assert sim.books.stats()["counters"].get("run.call", 0) == 0


async def test_run_settles_every_request_and_matches_the_simulator(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    ledger = Ledger()
    job = write_job(job_lines(30))
    result = await run(sim, job, ledger)
    assert result.state == "done"
    assert result.states == {"ok": 30}
    assert result.spent_nanos == sim.books.charged_nanos
    path = tmp_path / "out.parquet"
    assert export_parquet(ledger, result.run_id, path) == 30
    df = pl.read_parquet(path)
    assert dict(df.schema) == schema()
    assert df["price_usd"].sum() == from_nanos(sim.books.charged_nanos)
    assert df["metadata"].map_elements(
        lambda m: json.loads(m)["i"], return_dtype=pl.Int64
    ).sort().to_list() == list(range(30))
    assert (df["quote_usd"] >= df["price_usd"]).all()
    assert df["started_at"].dtype == pl.Datetime("us", "UTC")


async def test_a_run_as_a_lazy_frame_honours_filters_limits_and_columns(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger()
    result = await run(sim, write_job(job_lines(9)), ledger)
    monkeypatch.setattr("runner.app.export.READ_BATCH", 2)  # limits and filters across batches
    lazy = lazy_run(ledger, result.run_id)
    assert lazy.collect().equals(run_frame(ledger, result.run_id))
    picked = lazy.filter(pl.col("line") % 2 == 1).select("custom_id").head(3).collect()
    assert picked["custom_id"].to_list() == ["q0", "q2", "q4"]
    assert lazy.head(5).collect().height == 5


async def test_second_run_resumes_and_sends_nothing(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    ledger = Ledger()
    job = write_job(job_lines(10))
    first = await run(sim, job, ledger)
    calls = sim.books.counters["run.call"]
    dry_runs = sim.books.counters["run.dry_run"]
    again = await run(sim, job, ledger)
    assert again.run_id == first.run_id or again.state == "done"
    assert sim.books.counters["run.call"] == calls
    assert sim.books.counters["run.dry_run"] == dry_runs  # quotes come from the ledger


async def test_kept_dry_run_quotes_are_reused_for_a_day_then_asked_again(
    sim: SimulatorThread, write_job: Callable[..., Path], ledger_url: str
) -> None:
    ledger = Ledger(ledger_url)
    job = write_job(job_lines(6))
    first = await run(sim, job, ledger)
    assert sim.books.counters["run.dry_run"] == 6

    def age_quotes(hours: int) -> None:
        then = time_text(utcnow() - timedelta(hours=hours))
        with ledger.transaction() as tx:
            tx.conn.execute("UPDATE quotes SET at = ?", (then,))

    age_quotes(48)  # a provider's prices may have changed since
    again = await run(sim, job, ledger)  # the same run: its rows hold their quotes, none is asked
    assert again.run_id == first.run_id and sim.books.counters["run.dry_run"] == 6
    fresh = await run(sim, job, ledger, new=True, cache="refresh")  # a new run is quoted anew
    assert fresh.run_id != first.run_id and sim.books.counters["run.dry_run"] == 12
    age_quotes(23)  # younger than a day: reused
    await run(sim, job, ledger, new=True, cache="refresh")
    assert sim.books.counters["run.dry_run"] == 12
    age_quotes(25)
    await run(sim, job, ledger, new=True, cache="refresh")
    assert sim.books.counters["run.dry_run"] == 18


async def test_a_changed_line_is_a_clear_error(sim: SimulatorThread, write_job: Callable[..., Path]) -> None:
    ledger = Ledger()
    lines = job_lines(5)
    job = write_job(lines)
    sim.books.configure({"balance": "0.0000001"})  # the run stops (402) and stays unfinished
    result = await run(sim, job, ledger)
    assert result.state == "stopped"
    lines[2]["messages"][0]["content"] = "edited"
    write_job(lines)
    with pytest.raises(JobChanged, match=r"job.jsonl:3: custom_id 'q2' changed"):
        await run(sim, job, ledger)


async def test_a_line_changed_after_the_checks_is_caught_before_it_is_sent(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run phase reads lines without the contract checks; their hash must still match."""
    ledger = Ledger()
    lines = job_lines(5)
    job = write_job(lines)
    sim.books.configure({"balance": "0.0000001"})
    first = await run(sim, job, ledger)
    assert first.states.get("pending", 0) > 0
    sent = sim.books.counters["run.call"]
    sim.books.configure({"balance": "100"})

    async def edit_after_checks(*args: Any, **kwargs: Any) -> None:
        lines[4]["messages"][0]["content"] = "edited between the checks and the sends"
        write_job(lines)

    monkeypatch.setattr("runner.app.run.note_balance", edit_after_checks)
    with pytest.raises(JobChanged, match=r"job.jsonl:5: custom_id 'q4' changed"):
        await run(sim, job, ledger, concurrency=1)
    rows = {r["custom_id"]: r for batch in ledger.iter_request_rows(first.run_id) for r in batch}
    assert rows["q4"]["state"] == "pending"
    assert sim.books.counters["run.call"] == sent  # a chunk is checked whole before any of it is sent


async def test_a_line_copied_into_the_job_during_the_run_is_sent_once(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copies name the same row, which reads `pending` until the first copy's reservation."""
    ledger = Ledger()
    lines = job_lines(3)
    job = write_job(lines)
    sim.books.configure({"balance": "0.0000001"})  # the first run stops at once: every line pending
    first = await run(sim, job, ledger)
    assert first.states == {"pending": 3}
    sent = sim.books.counters["run.call"]
    sim.books.configure({"balance": "100"})
    recover = runner.app.preflight.recover

    async def copy_a_line_after_the_checks(*args: Any, **kwargs: Any) -> None:
        await recover(*args, **kwargs)
        write_job([*lines, lines[1], lines[1]])

    monkeypatch.setattr("runner.app.preflight.recover", copy_a_line_after_the_checks)
    result = await run(sim, job, ledger, concurrency=4)
    assert result.states == {"ok": 3}
    assert sim.books.counters["run.call"] - sent == 3
    assert result.spent_nanos == sim.books.charged_nanos


async def test_a_run_left_while_it_was_being_prepared_starts_afresh(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are made during the quote pass; a process stopped then has sent nothing."""
    ledger = Ledger()
    lines = job_lines(6)
    job = write_job(lines)

    def stop_half_way(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ledger, "set_total", stop_half_way)
    with pytest.raises(KeyboardInterrupt):
        await run(sim, job, ledger)
    assert ledger.runs() == []  # stopped in this process: discarded on the way out
    monkeypatch.undo()

    ledger.create_run(
        "left", str(job.resolve()), ledger.create_budget("b", 10**9).id, "sim", state="preparing"
    )
    ledger.add_requests(
        [
            runner.app.preflight._row("left", r, Quote(Decimal("0.000000001"), exact=True, source="dry_run"))
            for r in iter_requests(job)
        ]
    )
    lines[0]["messages"][0]["content"] = "edited since"
    write_job(lines)  # a resumed run would call this line changed
    result = await run(sim, job, ledger)
    assert result.state == "done" and not result.resumed
    assert [r.id for r in ledger.runs()] == [result.run_id]
    assert sim.books.counters["run.call"] == 6


async def test_a_run_whose_rows_an_older_version_left_half_made_starts_afresh(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    """Before the `preparing` state, a run's rows were made in chunks and its total set after the
    last one (nothing sent before): such a run, its total unset, is made again, quoted anew."""
    ledger = Ledger()
    job = write_job(job_lines(6))
    ledger.create_run("old", str(job.resolve()), ledger.create_budget("b", 10**9).id, "sim")
    made = list(iter_requests(job))[:3]
    ledger.add_requests([runner.app.preflight._row("old", r, None) for r in made])  # quotes unknown
    result = await run(sim, job, ledger)
    assert result.state == "done" and not result.resumed
    assert [r.id for r in ledger.runs()] == [result.run_id]
    assert ledger.run(result.run_id).states == {"ok": 6}
    assert sim.books.counters["run.dry_run"] == 6 and sim.books.counters["run.call"] == 6


async def test_a_run_that_sent_requests_is_never_discarded(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    ledger = Ledger()
    result = await run(sim, write_job(job_lines(2)), ledger)
    with pytest.raises(LedgerError, match="has sent requests"):
        ledger.discard_run(result.run_id)
    assert ledger.run(result.run_id).states == {"ok": 2}


async def test_lines_removed_from_the_job_are_named_when_the_run_cannot_finish(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    ledger = Ledger()
    lines = job_lines(6)
    job = write_job(lines)
    sim.books.configure({"balance": "0.0000001"})
    first = await run(sim, job, ledger)
    assert first.states == {"pending": 6}
    sim.books.configure({"balance": "100"})
    write_job(lines[:4])
    resumed = await run(sim, job, ledger)
    assert resumed.resumed and resumed.state == "stopped"
    assert resumed.states == {"ok": 4, "pending": 2}
    assert resumed.reason is not None and "2 request(s) of the run have no line in" in resumed.reason
    assert not resumed.resumable  # running it again cannot help: the CLI does not say it would


async def test_a_run_another_live_worker_sends_is_joined_and_its_share_taken_over_when_it_dies(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second process joins the run instead of refusing it: it leaves the live worker's claimed
    request alone (no recovery of another's requests), and takes it over once that process dies."""
    monkeypatch.setattr("runner.engine.membership.TAKE_OVER_EVERY_S", 0.05)
    ledger = Ledger()
    job = write_job(job_lines(6))
    sim.books.configure({"balance": "0.0000001"})
    first = await run(sim, job, ledger)
    assert first.states.get("pending", 0) > 0
    sim.books.configure({"balance": "100"})
    live = await anyio.open_process([sys.executable, "-c", "import time; time.sleep(30)"])
    other = f"{socket.gethostname()}:{live.pid}:abc123"
    with ledger.transaction() as tx:  # the live process's worker, with one request claimed
        join = (
            "INSERT INTO workers (id, run_id, host, pid, state, started_at, seen_at, sent, ok, failed, slots)"
        )
        tx.conn.execute(
            join + " VALUES (?, ?, 'h', ?, 'running', ?, ?, 0, 0, 0, 1)",
            (other, first.run_id, live.pid, tx.now, tx.now),
        )
        tx.conn.execute(
            "UPDATE requests SET worker_id = ? WHERE run_id = ? AND custom_id = 'q5'", (other, first.run_id)
        )
    try:
        async with anyio.create_task_group() as tg:
            results: list[RunResult] = []

            async def second() -> None:
                results.append(await run(sim, job, ledger))

            tg.start_soon(second)
            with anyio.fail_after(20):
                while ledger.run(first.run_id).states.get("ok", 0) < 5:  # noqa: ASYNC110 - polls the ledger
                    await anyio.sleep(0.05)
            await anyio.sleep(0.3)
            assert ledger.run(first.run_id).states == {"ok": 5, "pending": 1}  # q5 is the live one's
            assert not results  # it waits while another worker holds unfinished requests
            live.kill()
            await live.wait()
    finally:
        if live.returncode is None:
            live.kill()
            await live.wait()
    [joined] = results
    assert joined.run_id == first.run_id
    assert ledger.run(first.run_id).states == {"ok": 6}
    assert ledger.run(first.run_id).state == "done"  # the last worker finished the run
    states = {w.id: w.state for w in ledger.workers(first.run_id)}
    assert states[other] == "gone"
    assert sorted(states.values()) == ["gone", "left", "left"]


async def test_the_claim_is_kept_fresh_through_a_long_pre_flight(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quoting a big job takes minutes: without touches another process would take the run at 30 s."""
    ledger = Ledger()
    monkeypatch.setattr("runner.app.preflight.OWNER_TOUCH_S", 0.05)
    quote = runner.app.preflight._quote
    seen: list[Any] = []

    async def slow_quote(*args: Any, **kwargs: Any) -> Any:
        estimate = await quote(*args, **kwargs)
        with ledger.reading() as c:
            before = c.execute("SELECT seen_at FROM runs").fetchone()[0]
        await anyio.sleep(0.3)
        with ledger.reading() as c:
            seen.append((before, c.execute("SELECT seen_at FROM runs").fetchone()[0]))
        return estimate

    monkeypatch.setattr("runner.app.preflight._quote", slow_quote)
    result = await run(sim, write_job(job_lines(3)), ledger)
    assert result.state == "done"
    [(before, after)] = seen
    assert after > before  # touched while it was still quoting


async def test_a_run_taken_over_during_its_pre_flight_is_not_sent(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger()
    job = write_job(job_lines(4))
    sim.books.configure({"balance": "0.0000001"})
    first = await run(sim, job, ledger)  # stopped at once: a run to resume
    sim.books.configure({"balance": "100"})
    sent = sim.books.counters["run.call"]
    monkeypatch.setattr("runner.app.preflight.OWNER_TOUCH_S", 0.05)
    quote = runner.app.preflight._quote

    async def taken_over_meanwhile(*args: Any, **kwargs: Any) -> Any:
        estimate = await quote(*args, **kwargs)
        with ledger.transaction() as tx:  # the others took this worker for gone
            tx.conn.execute(
                "UPDATE workers SET state = 'gone' WHERE run_id = ? AND state = 'running'", (first.run_id,)
            )
        await anyio.sleep(0.3)
        return estimate

    monkeypatch.setattr("runner.app.preflight._quote", taken_over_meanwhile)
    with pytest.raises(RunBusy, match="taken over"):
        await run(sim, job, ledger)
    assert sim.books.counters["run.call"] == sent


async def test_a_new_run_taken_over_and_discarded_while_prepared_says_so(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process that took it over discards a run still being prepared; this one's rows then have
    no run to belong to: a RunBusy, not a database error."""
    ledger = Ledger()
    monkeypatch.setattr("runner.app.preflight.OWNER_TOUCH_S", 0.05)
    quote = runner.app.preflight._quote

    async def taken_and_discarded(*args: Any, **kwargs: Any) -> Any:
        run_id = ledger.runs()[0].id
        with ledger.transaction() as tx:
            tx.conn.execute("UPDATE runs SET owner = 'elsewhere:1' WHERE id = ?", (run_id,))
        await anyio.sleep(0.3)
        ledger.discard_run(run_id)
        return await quote(*args, **kwargs)

    monkeypatch.setattr("runner.app.preflight._quote", taken_and_discarded)
    with pytest.raises(RunBusy, match="taken over"):
        await run(sim, write_job(job_lines(3)), ledger)
    assert sim.books.counters["run.call"] == 0


async def test_a_ledger_that_cannot_be_written_stops_the_run_with_a_message_and_it_resumes(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger()
    job = write_job(job_lines(40))
    transaction = ledger.transaction
    commits = [0]

    @contextlib.contextmanager
    def filling_up() -> Any:
        commits[0] += 1
        with transaction() as tx:
            if commits[0] > 12:  # a few commits into the run, as the driver says it
                raise sqlite3.OperationalError("database or disk is full")
            yield tx

    monkeypatch.setattr(ledger, "transaction", filling_up)
    with pytest.raises(
        LedgerUnavailable, match=r"cannot be used \(database or disk is full\); free some space"
    ):
        await run(sim, job, ledger, concurrency=4)
    monkeypatch.undo()
    resumed = await run(sim, job, ledger, concurrency=4)
    assert resumed.resumed and resumed.state == "done"
    # in flight when the ledger failed: resolved by the provider's charges as the run resumed
    # (charged: failed with no answer, at the charge; not charged: sent again), or still possibly billed
    assert set(resumed.states) <= {"ok", "possibly_billed", "failed"}
    view = ledger.budget_by_id(ledger.run(resumed.run_id).budget_id)
    charged_unrecorded = sim.books.charged_nanos - resumed.spent_nanos
    assert 0 <= charged_unrecorded <= view.possibly_billed_nanos  # paid but unrecorded: possibly billed


async def test_402_stops_the_run_fast_and_resume_finishes_it(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    ledger = Ledger()
    job = write_job(job_lines(40))
    sim.books.configure({"script": [{"fault": "402"}]})
    sim.books.configure({"latency": "0.05"})
    result = await run(sim, job, ledger)
    assert result.state == "stopped"
    assert "provider stopped the run" in (result.reason or "")
    assert result.states.get("pending", 0) > 0
    resumed = await run(sim, job, ledger)
    assert resumed.run_id == result.run_id
    assert resumed.state == "done"
    assert resumed.states == {"ok": 40}
    assert resumed.spent_nanos == sim.books.charged_nanos


@pytest.mark.parametrize(
    ("faults", "state", "attempts"),
    [
        (["429", "429", "429"], "ok", 4),
        (["500", "502", "503"], "ok", 4),
        (["502html"], "ok", 2),
        (["envelope"], "ok", 2),
        (["reset"], "possibly_billed", 1),
        (["stall"], "possibly_billed", 1),
        (["500"] * 6, "failed", 6),
    ],
)
async def test_fault_matrix(
    sim: SimulatorThread,
    write_job: Callable[..., Path],
    faults: list[str],
    state: str,
    attempts: int,
) -> None:
    ledger = Ledger()
    job = write_job(job_lines(3))
    sim.books.configure({"stall_s": 2.0, "script": [{"fault": f, "match": "question q 1"} for f in faults]})
    result = await run(sim, job, ledger)
    rows = {r["custom_id"]: r for batch in ledger.iter_request_rows(result.run_id) for r in batch}
    assert rows["q1"]["state"] == state
    assert rows["q1"]["attempts"] == attempts
    assert rows["q0"]["state"] == rows["q2"]["state"] == "ok"
    view = ledger.budget_by_id(ledger.run(result.run_id).budget_id)
    assert view.reserved_nanos == 0
    held = rows["q1"]["reserved_nanos"] if state == "possibly_billed" else 0
    assert view.possibly_billed_nanos == held
    # the simulator charged what the runner settled, plus what is possibly billed
    settled = sum(r["price_nanos"] or 0 for r in rows.values())
    assert view.spent_nanos == settled
    extra = sim.books.charged_nanos - settled
    assert extra == 0 if state != "possibly_billed" else 0 < extra <= held


async def test_over_budget_refuses_and_partial_runs_what_fits(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    ledger = Ledger()
    ledger.create_budget("small", 60_000)  # $0.00006: a few requests' quotes
    job = write_job(job_lines(20))
    with pytest.raises(BudgetExceeded) as caught:
        await run(sim, job, ledger, budget="small")
    assert caught.value.shortfall_nanos > 0
    assert sim.books.counters["run.call"] == 0
    assert ledger.runs() == []  # a refused run leaves no trace: the edited job starts afresh
    result = await run(sim, job, ledger, budget="small", partial=True, concurrency=1)
    view = ledger.budget("small")
    assert 0 < result.states["ok"] < 20
    assert view.spent_nanos + view.reserved_nanos <= view.limit_nanos
    assert result.state == "stopped"


async def test_requests_that_cannot_be_priced_stop_the_run_before_any_send(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    """No price, no reservation: the run is refused (exit 3), unless --partial runs the rest."""
    ledger = Ledger()
    job = write_job(job_lines(5))
    failing_dry_runs = [{"fault": "500", "match": "question q 2", "target": "dry_run"}] * 6
    sim.books.configure({"script": failing_dry_runs})  # every attempt at q2's quote fails
    with pytest.raises(
        Unpriced, match=r"1 of 5 requests could not be priced.*'q2': gave up: HTTP 500"
    ) as caught:
        await run(sim, job, ledger)
    assert caught.value.count == 1
    assert sim.books.counters["run.call"] == 0
    assert ledger.runs() == []
    sim.books.configure({"script": failing_dry_runs})
    result = await run(sim, job, ledger, partial=True)
    assert result.states == {"ok": 4, "skipped": 1}
    assert sim.books.counters["run.call"] == 4


@pytest.mark.parametrize("url", ["notaurl", "ftp://host/v1", "http://"])
def test_a_base_url_that_cannot_be_called_is_a_usage_error(
    write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("ORTHOGONAL_API_KEY", "k")
    result = cli.invoke(app, ["run", str(write_job(job_lines(2))), "--base-url", url, "--max-usd", "1"])
    assert result.exit_code == 2, result.output
    assert f"the base URL must look like https://host[:port][/path] (got '{url}')" in result.output


def test_estimate_cli_caches_quotes_and_exits_3_over_budget(write_job: Callable[..., Path]) -> None:
    job = write_job(job_lines(12))
    assert cli.invoke(app, ["budget", "create", "tiny", "--limit", "0.00001"]).exit_code == 0
    first = cli.invoke(app, ["estimate", str(job), "--provider", "simulator"])
    assert first.exit_code == 0, first.output
    assert "quote calls made: 12" in first.output
    second = cli.invoke(app, ["estimate", str(job), "--provider", "simulator", "--budget", "tiny"])
    assert "quote calls made: 0" in second.output  # a fresh simulator saw no dry run at all
    assert second.exit_code == 3
    assert "over budget 'tiny' by $" in second.output


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--concurrency", "0"], "--concurrency must be 1 or more (got 0)"),
        (["--rpm", "-5"], "--rpm must be above 0 (got -5)"),
        (["--tpm", "0"], "--tpm must be above 0 (got 0)"),
        (["--timeout", "0"], "--timeout must be above 0 seconds (got 0)"),
        (["--connect-timeout", "nan"], "--connect-timeout must be above 0 seconds (got nan)"),
    ],
)
def test_limits_out_of_range_are_usage_errors_named_before_any_work(
    write_job: Callable[..., Path], option: list[str], message: str
) -> None:
    job = write_job(job_lines(3))
    result = cli.invoke(app, ["run", str(job), "--provider", "simulator", "--max-usd", "1", *option])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "valid" not in result.output  # refused before the job was even read
    assert Ledger().runs() == []
    estimate = cli.invoke(app, ["estimate", str(job), "--provider", "simulator", "--concurrency", "0"])
    assert estimate.exit_code == 2
    assert "--concurrency must be 1 or more" in estimate.output


@pytest.mark.parametrize("where", ["a file/x.parquet", "a folder"])
def test_an_output_that_cannot_be_written_is_refused_before_the_run(
    write_job: Callable[..., Path], tmp_path: Path, where: str
) -> None:
    job = write_job(job_lines(3))
    (tmp_path / "a file").write_text("not a folder")
    (tmp_path / "a folder").mkdir()
    output = tmp_path / where
    args = ["run", str(job), "--provider", "simulator", "--max-usd", "1", "-o", str(output)]
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"--output: {output}" in result.output
    assert Ledger().runs() == []  # nothing quoted into a run, nothing sent
    assert "Traceback" not in result.output


def test_an_export_that_fails_names_the_path_and_keeps_the_run(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger()
    result = anyio.run(lambda: run(sim, write_job(job_lines(2)), ledger))

    def disk_full(*args: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("runner.cli.runs.export_parquet", disk_full)
    out = cli.invoke(app, ["export", result.run_id, "-o", str(tmp_path / "r.parquet")])
    assert out.exit_code == 2
    assert "No space left on device" in out.output
    assert f"runner export {result.run_id} -o PATH" in out.output


def test_openai_batch_export_validates_as_chat_completions(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    ledger = Ledger()
    job = write_job(job_lines(4))
    sim.books.configure({"script": [{"fault": "reset", "match": "question q 3"}]})
    result = anyio.run(lambda: run(sim, job, ledger))
    path = tmp_path / "out.jsonl"
    assert export_jsonl(ledger, result.run_id, path) == 4
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        assert set(line) == {"id", "custom_id", "response", "error"}
        if line["custom_id"] == "q3":
            assert line["response"] is None and line["error"]["code"]
        else:
            assert line["response"]["status_code"] == 200
            ChatCompletion.model_validate(line["response"]["body"])


def test_demo_command_from_the_readme_runs_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "RUNNER_DB": f"sqlite:///{tmp_path / 'demo.db'}"}
    out = tmp_path / "demo.parquet"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "run",
            "jobs/demo.jsonl",
            "--provider",
            "simulator",
            "--max-usd",
            "1.00",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    df = pl.read_parquet(out)
    assert df.height == 22
    assert (df["status"] == "ok").all()
    assert to_nanos(df["price_usd"].sum()) > 0


def test_python_api_runs_and_reports(tmp_path: Path) -> None:
    ledger = runner.Ledger()
    result = anyio.run(runner.run_simulated, "jobs/demo.jsonl", "1.00", ledger)
    assert result.state == "done"
    table = runner.per_model(runner.run_frame(ledger, result.run_id))
    assert table["ok"].sum() == 22
    assert table["charged_usd"].sum() == from_nanos(result.spent_nanos)


async def test_the_streamed_report_of_a_parquet_equals_the_in_memory_one(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    ledger = Ledger()
    sim.books.configure({"script": [{"fault": "500", "match": "question q 3"}] * 6})
    lines = job_lines(12) + [{**line, "model": "deepseek-ai/DeepSeek-V3.1"} for line in job_lines(5, "d")]
    result = await run(sim, write_job(lines), ledger)
    path = tmp_path / "out.parquet"
    export_parquet(ledger, result.run_id, path)
    models, errors = summarize(pl.scan_parquet(path).select(REPORT_NEEDS))
    frame = run_frame(ledger, result.run_id, REPORT_NEEDS)
    assert models.equals(per_model(frame))
    assert errors.equals(top_errors(frame))
    assert models["ok"].to_list() == [5, 11]
    assert models["failed"].to_list() == [0, 1]
    assert errors["count"].to_list() == [1]


@pytest.mark.parametrize("refusal", ["401", "402"])
def test_a_401_or_402_during_the_dry_runs_stops_with_a_message_and_leaves_no_run(
    sim: SimulatorThread, write_job: Callable[..., Path], refusal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = write_job(job_lines(40))
    if refusal == "401":
        sim.books.api_key = "the-right-key"
    else:
        sim.books.configure({"script": [{"fault": "402", "target": "dry_run"}] * 80})  # two commands
    monkeypatch.setenv("ORTHOGONAL_API_KEY", "a-wrong-key")
    base = ["--provider", "orthogonal", "--base-url", sim.base_url]
    for command in (["run", str(job), *base, "--max-usd", "1"], ["estimate", str(job), *base]):
        result = cli.invoke(app, command)
        assert result.exit_code == 4, result.output
        assert f"the provider refused the dry runs, nothing was sent: HTTP {refusal}" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "a-wrong-key" not in result.output
    assert Ledger().runs() == []
    assert sim.books.stats()["counters"].get("run.call", 0) == 0


def test_estimate_shows_an_unknown_price_as_unknown_and_exits_as_run_does(
    write_job: Callable[..., Path],
) -> None:
    """Kimi-K2-Thinking has no published price: never $0, and a job with it is refused as `run`
    refuses it (exit 3)."""
    lines = [*job_lines(2), {**job_lines(1, "k")[0], "model": "moonshotai/Kimi-K2-Thinking"}]
    result = cli.invoke(
        app,
        ["estimate", str(write_job(lines)), "--provider", "openai", "--base-url", "http://127.0.0.1:9/v1"],
    )
    assert result.exit_code == 3, result.output
    kimi = next(line for line in result.output.splitlines() if "Kimi-K2-Thinking" in line)
    assert "unknown" in kimi and "$0.000000" not in kimi
    assert "1 request(s) could not be priced" in result.output


async def test_a_deadline_stops_launching_and_the_run_drains(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    import time  # noqa: PLC0415

    sim.books.configure({"latency": "0.2"})
    ledger = Ledger()
    result = await run(sim, write_job(job_lines(40)), ledger, concurrency=2, deadline=time.time() + 1.0)
    assert result.state == "stopped" and result.reason is not None and "deadline" in result.reason
    assert 0 < result.states["ok"] < 40
    assert set(result.states) == {"ok", "pending"}  # nothing cut off: in flight drained
    assert result.spent_nanos == sim.books.charged_nanos
    path = tmp_path / "d.parquet"
    assert export_parquet(ledger, result.run_id, path) == 40


def _cli_run(sim: SimulatorThread, job: Path, *args: str) -> Any:
    base = ["run", str(job), "--provider", "orthogonal", "--base-url", sim.base_url, "--concurrency", "4"]
    return cli.invoke(app, [*base, *args], env={"ORTHOGONAL_API_KEY": "k"})


def test_retry_failed_sends_the_failed_requests_again_as_new_attempts(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    job = write_job(job_lines(10))
    assert cli.invoke(app, ["budget", "create", "night", "--limit", "1"]).exit_code == 0
    sim.books.configure({"script": [{"fault": "400", "match": "question q 3"}]})
    first = _cli_run(sim, job, "--budget", "night")
    assert first.exit_code == 5, first.output  # finished, one failed
    run = Ledger().runs()[0]
    assert run.states == {"ok": 9, "failed": 1}
    again = _cli_run(sim, job, "--budget", "night", "--retry-failed")
    assert again.exit_code == 0, again.output
    assert Ledger().run(run.id).states == {"ok": 10}
    with Ledger().reading() as c:
        sql = (
            "SELECT outcome FROM attempts JOIN requests ON requests.id = attempts.request_id"
            " WHERE custom_id = 'q3' ORDER BY attempts.id"
        )
        outcomes = [row[0] for row in c.execute(sql)]
    assert outcomes == ["fatal", "ok"]  # both attempts on record
    assert sim.books.stats()["counters"]["run.call"] == 10  # the 400 is answered before it counts a call


def test_a_run_orphaned_by_new_is_finished_with_run_and_the_stop_hint_says_how(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    job = write_job(job_lines(6))
    sim.books.configure({"balance": "0.0000001"})  # every run stops at once: its lines stay pending
    first = _cli_run(sim, job, "--max-usd", "1")
    assert first.exit_code == 4
    orphan = Ledger().runs()[0].id
    assert f"--run {orphan}" in first.output
    second = _cli_run(sim, job, "--max-usd", "1", "--new")
    assert second.exit_code == 4
    assert "--new" not in second.output.split("to go on with it:")[1].splitlines()[0]
    sim.books.configure({"balance": "100"})
    third = _cli_run(sim, job, "--max-usd", "1", "--run", orphan)
    assert third.exit_code == 0, third.output
    assert Ledger().run(orphan).states == {"ok": 6}
    assert len(Ledger().runs()) == 2
    elsewhere = write_job(job_lines(2), "other.jsonl")
    wrong = _cli_run(sim, elsewhere, "--max-usd", "1", "--run", orphan)
    assert wrong.exit_code == 2 and "not of this job" in wrong.output


def test_resume_finishes_an_orphaned_run_from_what_the_ledger_recorded(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    job = write_job(job_lines(6))
    sim.books.configure({"balance": "0.0000001"})  # both runs stop at once: their lines stay pending
    assert _cli_run(sim, job, "--max-usd", "1").exit_code == 4
    orphan = Ledger().runs()[0].id
    assert _cli_run(sim, job, "--max-usd", "1", "--new").exit_code == 4
    sim.books.configure({"balance": "100"})
    env = {"ORTHOGONAL_API_KEY": "k"}
    out = tmp_path / "resumed.parquet"
    calls = sim.books.stats()["counters"]["run.call"]  # the refused ones of the two runs
    # job, provider, base URL and budget from the ledger: none of them given again
    done = cli.invoke(app, ["resume", orphan[:8], "--concurrency", "4", "-o", str(out)], env=env)
    assert done.exit_code == 0, done.output
    assert f"resuming run {orphan}" in done.output
    assert Ledger().run(orphan).states == {"ok": 6}
    assert pl.read_parquet(out).height == 6
    assert sim.books.stats()["counters"]["run.call"] - calls == 6
    unknown = cli.invoke(app, ["resume", "nosuchrun"], env=env)
    assert unknown.exit_code == 1 and "no run 'nosuchrun'" in unknown.output
    job.unlink()
    other = Ledger().runs()[0].id
    gone = cli.invoke(app, ["resume", other], env=env)
    assert gone.exit_code == 1 and str(job) in gone.output and "Traceback" not in gone.output


def test_a_finished_job_run_again_under_another_budget_is_a_new_run(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    job = write_job(job_lines(4))
    for name in ("first", "second"):
        assert cli.invoke(app, ["budget", "create", name, "--limit", "1"]).exit_code == 0
    assert _cli_run(sim, job, "--budget", "first").exit_code == 0
    again = _cli_run(sim, job, "--budget", "second")
    assert again.exit_code == 0, again.output
    assert "is finished; a new run starts under budget 'second'" in again.output
    assert [r.states for r in Ledger().runs()] == [{"ok": 4}, {"ok": 4}]


def test_a_run_stopped_at_its_max_usd_goes_on_with_a_higher_one(
    sim: SimulatorThread, write_job: Callable[..., Path]
) -> None:
    job = write_job(job_lines(8))
    env = {"ORTHOGONAL_API_KEY": "k"}
    base = ["--provider", "orthogonal", "--base-url", sim.base_url]
    quoted = cli.invoke(app, ["estimate", str(job), *base, "--json"], env=env)
    total = Decimal(json.loads(quoted.output)["total_usd"])
    half = (total / 2).quantize(Decimal("0.000000001"))
    refused = _cli_run(sim, job, "--max-usd", str(half))
    assert refused.exit_code == 3
    assert f"give --max-usd at least {format_usd(to_nanos(total))}" in refused.output
    first = _cli_run(sim, job, "--max-usd", str(half), "--partial")
    assert first.exit_code == 4 and "budget reached" in first.output
    run = Ledger().runs()[0]
    sent = run.states["ok"]
    assert 0 < sent < 8
    low = _cli_run(sim, job, "--max-usd", "0.000000001")
    assert low.exit_code == 2 and "below what run" in low.output
    again = _cli_run(sim, job, "--max-usd", str(total))
    assert again.exit_code == 0, again.output
    assert f"run {run.id}: its limit is now {format_usd(to_nanos(total))}" in again.output
    assert Ledger().run(run.id).states == {"ok": 8}
    assert len(Ledger().runs()) == 1  # the same run went on
    assert sim.books.stats()["counters"]["run.call"] == 8  # nothing sent twice

    # a run held against a named budget: --max-usd does not quietly change (or ignore) it
    other = write_job(job_lines(4), "named.jsonl")
    assert cli.invoke(app, ["budget", "create", "team", "--limit", str(half / 2)]).exit_code == 0
    # (--cache off: these lines were answered above, and would be copied at no cost)
    assert _cli_run(sim, other, "--budget", "team", "--partial", "--cache", "off").exit_code == 4
    named = _cli_run(sim, other, "--max-usd", "1", "--cache", "off")
    assert named.exit_code == 2 and "runner budget raise team --to USD" in named.output


def test_json_documents_parse_and_carry_money_as_decimal_strings(write_job: Callable[..., Path]) -> None:
    job = write_job(job_lines(5))
    assert cli.invoke(app, ["budget", "create", "night", "--limit", "1"]).exit_code == 0
    estimate = cli.invoke(
        app, ["estimate", str(job), "--provider", "simulator", "--budget", "night", "--json"]
    )
    assert estimate.exit_code == 0, estimate.output
    quoted = json.loads(estimate.output)
    assert Decimal(quoted["total_usd"]) > 0 and quoted["budget_remaining_usd"] == "1.000000000"
    assert quoted["per_model"]["openai/gpt-oss-120b"]["requests"] == 5
    ran = cli.invoke(app, ["run", str(job), "--provider", "simulator", "--budget", "night"])
    assert ran.exit_code == 0, ran.output
    run_id = Ledger().runs()[0].id
    documents = {
        "runs": ["runs", "--json"],
        "status": ["status", run_id, "--json"],
        "list": ["budget", "list", "--json"],
        "show": ["budget", "show", "night", "--json"],
        "history": ["budget", "history", "night", "--json"],
        "report": ["report", run_id, "--json"],
    }
    got = {}
    for name, args in documents.items():
        result = cli.invoke(app, args)
        assert result.exit_code == 0, result.output
        got[name] = json.loads(result.output)
    spent = Decimal(got["status"]["spent_usd"])
    assert got["runs"][0]["id"] == run_id and got["status"]["states"] == {"ok": 5}
    assert Decimal(got["show"]["spent_usd"]) == spent == Decimal(got["list"][0]["spent_usd"])
    assert {e["kind"] for e in got["history"]} >= {"create", "reserve", "settle"}
    assert all(isinstance(e["amount_usd"], str) for e in got["history"])
    model = got["report"]["models"][0]
    assert Decimal(model["charged_usd"]) == spent and model["ok"] == 5


async def test_a_request_far_slower_than_the_rest_is_reported_as_stalled(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.core.events import Funds  # noqa: PLC0415

    monkeypatch.setattr("runner.engine.membership.FUNDS_EVERY_S", 0.05)
    monkeypatch.setattr("runner.engine.membership.STALL_MIN_S", 0.3)
    sim.books.configure({"latency": "0.02", "script": [{"fault": "stall", "match": "question q 30"}]})
    seen: list[int] = []

    def listen(event: object) -> None:
        if isinstance(event, Funds):
            seen.append(event.stalled)

    ledger = Ledger()
    provider = OrthogonalProvider(api_key="k", base_url=sim.base_url, timeouts=Timeouts(1.0, 1.0))
    try:
        result = await run_job(
            RunConfig(job=write_job(job_lines(60)), max_usd=Decimal(1), concurrency=4),
            conn=Connection(provider, "sim"),
            ledger=ledger,
            on_event=listen,
        )
    finally:
        await provider.aclose()
    assert max(seen) == 1  # the one stalled call, while it hung
    assert seen[-1] == 0 or result.states.get("possibly_billed") == 1


async def test_a_run_whose_ledger_is_found_damaged_at_its_end_stops_with_the_reason(
    sim: SimulatorThread, write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The integrity check itself is tested on a file with pages overwritten (test_ledger.py); here,
    that a run ends on what it finds: stopped, with the damage and the remedy, never "done"."""
    ledger = Ledger()
    monkeypatch.setattr(Ledger, "damage", lambda self: "*** in database main *** Page 7: never used")
    result = await run(sim, write_job(job_lines(3)), ledger)
    assert result.state == "stopped"
    assert result.reason is not None and "is damaged (*** in database main *** Page 7" in result.reason
    assert "restore it from a backup" in result.reason
    assert ledger.run(result.run_id).state == "stopped"


async def test_answers_paid_for_survive_a_ledger_that_fills_up_and_reach_the_parquet(
    sim: SimulatorThread, write_job: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once 8 calls are charged the ledger's file may not grow (SQLite's max_page_count: a real
    "database or disk is full" from the driver). The run stops (stopped: exit 4); the answers
    charged meanwhile are kept, in memory, then in a recovery file beside the ledger; once there is
    room, running the job again writes them first: every line ok with its answer, each charged once.
    The calls in flight when the ledger filled finish (their answers kept), never cancelled."""
    from runner.ledger.db import SqliteDatabase  # noqa: PLC0415 - the file's own limits, for the test

    full = [True]

    @contextlib.contextmanager
    def writing(self: SqliteDatabase) -> Any:
        with self._connection() as conn:
            limited = full[0] and len(sim.books.transactions) >= 8
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            conn.execute(f"PRAGMA max_page_count = {pages if limited else 1 << 30}")
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")

    monkeypatch.setattr(SqliteDatabase, "writing", writing)
    sim.books.configure({"latency": "0.05-0.15"})
    lines = job_lines(40, max_tokens=400)  # long answers: settlements need new pages
    job = write_job(lines)
    ledger = Ledger()
    stopped = await run(sim, job, ledger, concurrency=8)
    assert stopped.state == "stopped"
    assert stopped.reason is not None and "cannot be used (database or disk is full)" in stopped.reason
    folder = anyio.Path(tmp_path)
    kept_files = [path async for path in folder.glob("runner-unsaved-answers-*.jsonl")]
    assert len(kept_files) == 1  # beside the ledger
    assert (await kept_files[0].read_text()).count("\n") >= 1
    charged_first = len(sim.books.transactions)
    full[0] = False  # room again
    result = await run(sim, job, ledger, concurrency=8)
    assert result.state == "done" and result.states == {"ok": 40}
    assert not [path async for path in folder.glob("runner-unsaved-answers-*.jsonl")]
    out = tmp_path / "out.parquet"
    export_parquet(ledger, result.run_id, out)
    frame = pl.read_parquet(out)
    assert frame["status"].to_list() == ["ok"] * 40
    assert frame["content"].null_count() == 0
    assert (frame["error_type"].is_null()).all()
    assert len(sim.books.transactions) == 40 >= charged_first  # each line charged once
    assert ledger.run(result.run_id).spent_nanos == sim.books.charged_nanos
