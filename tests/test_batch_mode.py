"""Batch mode against the simulator's Batch API: held at batch prices before upload, settled by line,
expired lines sent again, the deadline met by switching to calls, the money the same in the ledger,
the simulator's books and the Parquet."""

from __future__ import annotations

import json
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from rich.console import Console
from typer.testing import CliRunner

from runner.app.export import export_parquet
from runner.app.reconcile import reconcile_batches
from runner.app.run import RunResult, run_job
from runner.cli.console import print_report
from runner.cli.main import app
from runner.core import catalog
from runner.core.config import ProviderSettings, RunConfig
from runner.core.errors import ConfigError
from runner.core.events import Event, Notice
from runner.core.money import to_nanos
from runner.ledger import Ledger
from runner.providers.registry import connect
from runner.simulator import SimulatorThread

MODEL = "openai/gpt-oss-120b"
INFO = catalog.MODELS[MODEL]
cli = CliRunner()


def lines(n: int, prefix: str = "b", max_tokens: int = 60) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "model": MODEL,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"{prefix} question {i}"}],
        }
        for i in range(n)
    ]


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    """The simulator's own prices for the model, and its batch prices: half."""
    path = tmp_path / "prices.toml"
    path.write_text(f'["{MODEL}"]\ninput = 0.10\noutput = 0.50\nbatch_discount = 0.5\n')
    return path


async def batch_run(
    sim: SimulatorThread, job: Path, ledger: Ledger, prices: Path, notes: list[str] | None = None, **kw: Any
) -> RunResult:
    settings = ProviderSettings(name="openai", base_url=f"{sim.base_url}/v1", api_key="k", price_file=prices)
    config = RunConfig(
        job=job,
        provider=settings,
        max_usd=kw.pop("max_usd", Decimal(5)),
        mode=kw.pop("mode", "batch"),
        batch_poll_s=(0.1, 0.5),
        **{"concurrency": 16, **kw},
    )

    def note(event: Event) -> None:
        if notes is not None and isinstance(event, Notice):
            notes.append(event.message)

    async with connect(settings) as conn:
        return await run_job(config, conn=conn, ledger=ledger, on_event=note)


def batch_price(row: dict[str, Any]) -> int:
    assert INFO.input_price is not None and INFO.output_price is not None
    sync = row["prompt_tokens"] * INFO.input_price + row["completion_tokens"] * INFO.output_price
    return to_nanos(sync / 2)


def sync_price(row: dict[str, Any]) -> int:
    assert INFO.input_price is not None and INFO.output_price is not None
    return to_nanos(row["prompt_tokens"] * INFO.input_price + row["completion_tokens"] * INFO.output_price)


def rows(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    return [row for chunk in ledger.iter_request_rows(run_id) for row in chunk]


def charged_once(sim: SimulatorThread) -> Counter[str]:
    batch_lines = Counter(t["customId"] for t in sim.books.transactions if t["batchId"])
    assert all(n == 1 for n in batch_lines.values()), batch_lines.most_common(3)
    return batch_lines


@pytest.mark.anyio
async def test_3000_lines_in_three_batches_at_half_price(
    sim: SimulatorThread, write_job: Any, prices: Path, tmp_path: Path
) -> None:
    sim.books.configure({"batch_duration": 0.5})
    job = write_job(lines(3000))
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    result = await batch_run(sim, job, ledger, prices, batch_size=1000)
    assert result.state == "done" and result.states == {"ok": 3000}
    assert sim.books.stats()["batches_created"] == 3
    assert [(p.lines, p.state, p.status) for p in ledger.parts(result.run_id)] == [
        (1000, "settled", "completed")
    ] * 3
    found = rows(ledger, result.run_id)
    assert all(r["mode"] == "batch" and r["price_nanos"] == batch_price(r) for r in found)
    assert all(r["sync_price_nanos"] == sync_price(r) for r in found)
    assert len(charged_once(sim)) == 3000
    assert (
        sim.books.charged_nanos
        == result.spent_nanos
        == ledger.budget_by_id(ledger.run(result.run_id).budget_id).spent_nanos
    )
    # the Parquet says how each answer was bought; the report splits the modes and names the saving
    out = tmp_path / "out.parquet"
    export_parquet(ledger, result.run_id, out)
    frame = pl.read_parquet(out)
    assert frame["mode"].unique().to_list() == ["batch"]
    console = Console(record=True, width=200)
    print_report(ledger, result.run_id, out, console=console)
    saved = sum(r["sync_price_nanos"] - r["price_nanos"] for r in found)
    assert saved == result.spent_nanos  # half price: what was saved is what was paid
    text = console.export_text()
    assert f"batch: 3,000 answer(s), ${result.spent_nanos / 1e9:,.6f}, ${saved / 1e9:,.6f} saved" in text
    # reconciled against the provider's output files: every line matches
    async with connect(
        ProviderSettings(name="openai", base_url=f"{sim.base_url}/v1", api_key="k", price_file=prices)
    ) as conn:
        assert conn.batches is not None
        check = await reconcile_batches(ledger, result.run_id, conn.batches)
    assert check.ok and check.matched == 3000 and check.provider_nanos == result.spent_nanos


@pytest.mark.anyio
async def test_an_expiring_batch_settles_what_completed_and_sends_the_rest_again(
    sim: SimulatorThread, write_job: Any, prices: Path, ledger_url: str
) -> None:
    sim.books.configure({"batch_duration": 0.3, "batch_expire_fraction": 0.5})
    job = write_job(lines(40))
    ledger = Ledger(ledger_url)
    result = await batch_run(sim, job, ledger, prices)
    assert result.state == "done" and result.states == {"ok": 40}
    parts = ledger.parts(result.run_id)
    assert [(p.status, p.lines) for p in parts] == [("expired", 40), ("completed", 20)]
    assert sim.books.stats()["batches_created"] == 2
    assert sorted(charged_once(sim)) == sorted(f"b{i}" for i in range(40))
    assert sim.books.charged_nanos == result.spent_nanos
    assert all(r["price_nanos"] == batch_price(r) for r in rows(ledger, result.run_id))


@pytest.mark.anyio
async def test_line_errors_fail_their_lines_with_the_error_and_charge_nothing(
    sim: SimulatorThread, write_job: Any, prices: Path, tmp_path: Path
) -> None:
    sim.books.configure({"batch_duration": 0.1, "batch_line_error_rate": 0.25})
    job = write_job(lines(80))
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    result = await batch_run(sim, job, ledger, prices)
    failed = [r for r in rows(ledger, result.run_id) if r["state"] == "failed"]
    assert failed and result.states["ok"] + len(failed) == 80
    assert {r["error_type"] for r in failed} == {"http_500"}
    assert all("simulated server error" in r["error_message"] for r in failed)
    assert len(charged_once(sim)) == result.states["ok"]
    view = ledger.budget_by_id(ledger.run(result.run_id).budget_id)
    assert view.reserved_nanos == 0 and view.spent_nanos == sim.books.charged_nanos


@pytest.mark.anyio
async def test_a_batch_too_slow_for_the_deadline_switches_to_calls_in_time(
    sim: SimulatorThread, write_job: Any, prices: Path, ledger_url: str
) -> None:
    sim.books.configure({"batch_duration": 8})
    job = write_job(lines(40))
    ledger = Ledger(ledger_url)
    deadline = time.time() + 8
    notes: list[str] = []
    # calls taken to last 0.5 s, 10 at a time: 2 s for the 40 lines, switched with 1.5 x that to spare
    result = await batch_run(
        sim,
        job,
        ledger,
        prices,
        notes,
        deadline=deadline,
        sync_latency_s=0.5,
        concurrency=10,
        max_usd=Decimal(1),
    )
    assert time.time() < deadline
    assert result.state == "done" and result.states == {"ok": 40}
    assert any(n.startswith("switching to calls") for n in notes)
    found = rows(ledger, result.run_id)
    batch = [r for r in found if r["mode"] == "batch"]
    sync = [r for r in found if r["mode"] == "sync"]
    assert batch and sync and len(batch) + len(sync) == 40
    assert all(r["price_nanos"] == batch_price(r) for r in batch)
    assert all(r["price_nanos"] == sync_price(r) for r in sync)
    assert sorted(charged_once(sim)) == sorted(r["custom_id"] for r in batch)
    assert sim.books.counters["openai.chat"] == len(sync)
    assert sim.books.charged_nanos == result.spent_nanos <= to_nanos(Decimal(1))
    assert ledger.run(result.run_id).mode == "sync"


@pytest.mark.anyio
async def test_a_budget_too_small_for_the_switch_stops_with_the_reason_and_sends_no_call(
    sim: SimulatorThread, write_job: Any, prices: Path, tmp_path: Path
) -> None:
    sim.books.configure({"batch_duration": 30})
    job = write_job(lines(40))
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    # the batch quotes fit; the same lines as calls cost twice that
    total = sum(to_nanos(q) for q in [_batch_quote(line) for line in lines(40)])
    budget = Decimal(total) / Decimal(10**9) * Decimal("1.2")
    result = await batch_run(
        sim, job, ledger, prices, deadline=time.time() + 4, sync_latency_s=0.5, concurrency=10, max_usd=budget
    )
    assert result.state == "stopped" and "the deadline needs" in (result.reason or "")
    assert "nothing was sent as calls" in (result.reason or "")
    assert sim.books.counters["openai.chat"] == 0
    assert result.states == {"batched": 40}  # still held, the batch still running
    view = ledger.budget_by_id(ledger.run(result.run_id).budget_id)
    assert view.spent_nanos + view.reserved_nanos <= view.limit_nanos


def _batch_quote(line: dict[str, Any]) -> Decimal:
    from runner.providers.base import table_quote  # noqa: PLC0415

    info = INFO.with_batch_discount(Decimal("0.5")).at_batch_prices()
    quote = table_quote(line, info)
    assert quote.amount is not None
    return quote.amount


@pytest.mark.anyio
async def test_auto_picks_batch_without_a_deadline_and_sync_for_a_near_one(
    sim: SimulatorThread, write_job: Any, prices: Path, tmp_path: Path
) -> None:
    sim.books.configure({"batch_duration": 0.1})
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    notes: list[str] = []
    far = await batch_run(sim, write_job(lines(5, "far"), "far.jsonl"), ledger, prices, notes, mode="auto")
    assert any("--mode auto: batch (no deadline" in n for n in notes)
    assert {r["mode"] for r in rows(ledger, far.run_id)} == {"batch"}
    notes.clear()
    near = await batch_run(
        sim,
        write_job(lines(5, "near"), "near.jsonl"),
        ledger,
        prices,
        notes,
        mode="auto",
        deadline=time.time() + 3600,
    )
    assert any("--mode auto: sync (the deadline is closer than" in n for n in notes)
    assert {r["mode"] for r in rows(ledger, near.run_id)} == {"sync"}


@pytest.mark.anyio
async def test_batch_mode_where_it_cannot_be_is_a_usage_error(
    sim: SimulatorThread, write_job: Any, tmp_path: Path
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    no_batch = tmp_path / "plain.toml"
    no_batch.write_text(f'["{MODEL}"]\ninput = 0.10\noutput = 0.50\n')
    with pytest.raises(ConfigError, match=f"no batch price is known for '{MODEL}'"):
        await batch_run(sim, write_job(lines(3)), ledger, no_batch)
    assert sim.books.counters["files.created"] == 0


def test_batch_mode_on_the_run_api_and_an_unknown_mode_are_usage_errors(
    write_job: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORTHOGONAL_API_KEY", "k")
    monkeypatch.setenv("ORTHOGONAL_BASE_URL", "http://127.0.0.1:9")  # nothing is sent: refused first
    job = write_job(lines(3), "run_api.jsonl")
    result = cli.invoke(
        app, ["run", str(job), "--provider", "orthogonal", "--mode", "batch", "--max-usd", "1"]
    )
    assert result.exit_code == 2
    assert "the orthogonal provider has no Batch API" in result.output
    bad = cli.invoke(app, ["run", str(job), "--provider", "simulator", "--mode", "later", "--max-usd", "1"])
    assert bad.exit_code == 2 and "--mode must be one of sync, batch, auto" in bad.output


def test_the_offline_demo_runs_in_batch_mode(write_job: Any, tmp_path: Path) -> None:
    job = write_job(lines(25))
    out = tmp_path / "demo.parquet"
    args = [
        "run",
        str(job),
        "--provider",
        "simulator",
        "--mode",
        "batch",
        "--batch-size",
        "10",
        "--max-usd",
        "1",
    ]
    result = cli.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "batch 3 submitted" in result.output and "saved against call prices" in result.output
    frame = pl.read_parquet(out)
    assert frame.height == 25 and frame["mode"].unique().to_list() == ["batch"]
    run_id = frame["run_id"][0]
    status = cli.invoke(app, ["status", run_id])
    assert status.exit_code == 0 and status.output.count("completed") >= 3
    page = tmp_path / "report.html"
    shown = cli.invoke(app, ["report", run_id, "--html", str(page)])
    assert shown.exit_code == 0, shown.output
    assert "batch: 25 answers" in page.read_text() and "saved against call prices" in page.read_text()


@pytest.mark.anyio
async def test_a_batch_the_key_cannot_see_stops_the_run_and_the_right_key_collects_it(
    sim: SimulatorThread, write_job: Any, prices: Path, tmp_path: Path
) -> None:
    """A resume with another account's key is told so (the batch stays held), not polled forever."""
    sim.books.configure({"batch_duration": 1.0})
    job = write_job(lines(10))
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")

    async def change_key() -> None:
        while not sim.books.counters["batches_created"]:  # noqa: ASYNC110 - counted in its thread
            await anyio.sleep(0.01)
        sim.books.api_key = "another-account"

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(change_key)
        stopped = await batch_run(sim, job, ledger, prices)
    assert stopped.state == "stopped" and "cannot be looked at" in (stopped.reason or "")
    assert stopped.states == {"batched": 10}
    sim.books.api_key = None
    done = await batch_run(sim, job, ledger, prices)
    assert done.run_id == stopped.run_id and done.states == {"ok": 10}
    assert sim.books.stats()["batches_created"] == 1 and len(charged_once(sim)) == 10


def test_estimate_in_batch_mode_quotes_at_batch_prices(write_job: Any) -> None:
    job = write_job(lines(12))
    shown = cli.invoke(app, ["estimate", str(job), "--provider", "simulator", "--mode", "batch", "--json"])
    assert shown.exit_code == 0, shown.output
    total = sum(to_nanos(_batch_quote(line), round_up=True) for line in lines(12))
    document = json.loads(shown.stdout)
    assert Decimal(document["total_usd"]) == Decimal(total) / 10**9
    # the expected cost splits the batch quote at the batch prices: below the bound
    assert 0 < Decimal(document["expected_usd"]) < Decimal(document["total_usd"])


@pytest.mark.anyio
async def test_an_output_file_that_cannot_be_read_is_read_at_the_next_look(
    sim: SimulatorThread, write_job: Any, prices: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.core.errors import RetryableError  # noqa: PLC0415
    from runner.providers.batch import BatchClient  # noqa: PLC0415

    sim.books.configure({"batch_duration": 0.1})
    reads = []
    read = BatchClient.lines

    async def flaky(self: BatchClient, file_id: str) -> Any:
        reads.append(file_id)
        if len(reads) == 1:
            raise RetryableError("connection reset while reading the output (simulated)")
        async for line in read(self, file_id):
            yield line

    monkeypatch.setattr(BatchClient, "lines", flaky)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    notes: list[str] = []
    result = await batch_run(sim, write_job(lines(10)), ledger, prices, notes)
    assert result.state == "done" and result.states == {"ok": 10}
    assert any("its output could not be read" in n for n in notes) and len(reads) == 2
    assert len(charged_once(sim)) == 10 and sim.books.charged_nanos == result.spent_nanos
