"""The runner as a real OS process against the simulator in another: SIGKILL and resume, two runners on
one budget, Ctrl-C. The simulator's own charge ledger is the referee."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from runner.export import SCHEMA
from runner.ledger import Ledger
from runner.money import to_nanos

KEY = "sk-sim-process-test"


class SimProcess:
    """`runner simulator` in its own process, on an ephemeral port."""

    def __init__(self, latency: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "simulator", "--port", "0", "--latency", latency],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on" in line, line
        self.url = line.split("listening on ")[1].split()[0]
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.http.get("/_sim/stats").json()
        return result

    def charges(self) -> int:
        return int(self.stats()["transactions"])

    def transactions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.http.get(
            "/v1/credits/transactions", headers={"Authorization": f"Bearer {KEY}"}
        ).json()["transactions"]
        return found

    def close(self) -> None:
        self.http.close()
        self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def sim_process() -> Iterator[Callable[[str], SimProcess]]:
    started: list[SimProcess] = []

    def start(latency: str = "0.05-0.15") -> SimProcess:
        started.append(SimProcess(latency))
        return started[-1]

    yield start
    for sim in started:
        sim.close()


def lines(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "model": "openai/gpt-oss-120b",
            "max_tokens": 60,
            "messages": [{"role": "user", "content": f"{prefix} question number {i}"}],
        }
        for i in range(n)
    ]


def body_sha(line: dict[str, Any]) -> str:
    """What the simulator records for a charge: sha256 of the chat body as it arrived."""
    body = {k: v for k, v in line.items() if k != "custom_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def start_runner(sim: SimProcess, job: Path, db: Path, *args: str) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "runner",
        "run",
        str(job),
        "--provider",
        "orthogonal",
        "--base-url",
        sim.url,
        "--output",
        str(job.with_suffix(".parquet")),
        *args,
    ]
    env = {**os.environ, "RUNNER_DB": f"sqlite:///{db}", "ORTHOGONAL_API_KEY": KEY, "COLUMNS": "200"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=job.parent
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 60) -> bool:
    """True once `condition` holds while `proc` still runs; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.01)
    pytest.fail("timed out waiting for the runner")


def assert_within_budget(ledger: Ledger, name: str) -> None:
    view = ledger.budget(name)
    assert view.spent_nanos + view.reserved_nanos + view.possibly_billed_nanos <= view.limit_nanos


def test_sigkill_at_several_points_then_resume_matches_the_simulators_books(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    sim = sim_process("0.05-0.15")
    job_lines = lines("k", 240)
    job = tmp_path / "kill.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in job_lines))
    db = tmp_path / "ledger.db"
    ledger = Ledger(f"sqlite:///{db}")
    ledger.create_budget("night", to_nanos(Decimal(5)))

    kill_points: list[tuple[str, Callable[[], bool]]] = [
        ("while quoting", lambda: sim.stats()["counters"].get("run.dry_run", 0) >= 60),
        ("early in the run", lambda: sim.charges() >= 20),
        ("mid-run", lambda: sim.charges() >= 100),
        ("late in the run", lambda: sim.charges() >= 190),
    ]
    killed = []
    for where, condition in kill_points:
        proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "16")
        if wait_for(condition, proc):
            proc.send_signal(signal.SIGKILL)
            killed.append(where)
        proc.communicate(timeout=30)
        assert_within_budget(ledger, "night")
    assert len(killed) >= 3, killed

    for _ in range(3):  # resume until the run is done
        proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "16")
        output, _ = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, output
    assert "resuming run" in output

    runs = ledger.runs()
    assert len(runs) == 1, "every restart resumed the same run"
    rows = {r["custom_id"]: r for batch in ledger.iter_request_rows(runs[0]["id"]) for r in batch}
    assert len(rows) == len(job_lines)
    states = Counter(r["state"] for r in rows.values())
    assert set(states) == {"ok", "possibly_billed"}, states  # kills mid-request leave unknown outcomes

    by_line = {body_sha(line): line["custom_id"] for line in job_lines}
    charged: dict[str, list[int]] = {}
    for t in sim.transactions():
        charged.setdefault(by_line[t["body_sha256"]], []).append(int(t["amount_nanos"]))
    assert all(len(v) == 1 for v in charged.values()), "a request was paid for twice"
    for custom_id, row in rows.items():
        if row["state"] == "ok":  # exactly one charge, the one the simulator made, and its response
            assert charged[custom_id] == [row["price_nanos"]]
            assert row["content"]
        else:  # unknown outcome: perhaps charged (at most what was held), never re-sent
            assert sum(charged.get(custom_id, [])) <= row["reserved_nanos"]
            assert row["attempts"] == 1
    paid_but_marked = sum(sum(charged.get(c, [])) for c, r in rows.items() if r["state"] == "possibly_billed")
    view = ledger.budget("night")
    assert view.reserved_nanos == 0
    assert view.spent_nanos == sum(r["price_nanos"] for r in rows.values() if r["state"] == "ok")
    assert view.spent_nanos + paid_but_marked == int(sim.stats()["charged_nanos"])
    assert view.possibly_billed_nanos == sum(
        r["reserved_nanos"] for r in rows.values() if r["state"] == "possibly_billed"
    )
    assert_within_budget(ledger, "night")


def test_two_runners_share_one_budget_and_both_stop_at_it(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    sim = sim_process("0.02-0.06")
    db = tmp_path / "ledger.db"
    ledger = Ledger(f"sqlite:///{db}")
    jobs = []
    for prefix in ("a", "b"):
        job = tmp_path / f"{prefix}.jsonl"
        job.write_text("".join(json.dumps(line) + "\n" for line in lines(prefix, 150)))
        jobs.append(job)
    # each job's quote is about $0.0045 (150 x 60 output tokens at $0.50/1M): together they need ~$0.009
    ledger.create_budget("shared", to_nanos(Decimal("0.006")))
    args = ("--budget", "shared", "--partial", "--concurrency", "8")
    procs = [start_runner(sim, job, db, *args) for job in jobs]
    outputs = [p.communicate(timeout=120)[0] for p in procs]

    codes = [p.returncode for p in procs]
    assert set(codes) <= {0, 4}, outputs
    assert 4 in codes, "the budget cannot hold both jobs: at least one runner stops at it"
    for code, output in zip(codes, outputs, strict=True):
        if code == 4:
            assert "budget reached" in output
    view = ledger.budget("shared")
    assert view.reserved_nanos == 0 and view.possibly_billed_nanos == 0
    assert view.spent_nanos == int(sim.stats()["charged_nanos"])
    assert view.spent_nanos <= view.limit_nanos
    done = sum(r["states"].get("ok", 0) for r in ledger.runs())
    assert done == sim.charges() and done < 300


def test_ctrl_c_drains_in_flight_requests_and_the_run_resumes(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    sim = sim_process("0.4")
    job = tmp_path / "ctrlc.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in lines("c", 64)))
    db = tmp_path / "ledger.db"
    proc = start_runner(sim, job, db, "--max-usd", "1", "--concurrency", "8")
    assert wait_for(lambda: sim.stats()["counters"].get("run.call", 0) >= 12, proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 4, output
    assert "interrupted" in output and "resumable" in output

    ledger = Ledger(f"sqlite:///{db}")
    run = ledger.runs()[0]
    assert run["state"] == "interrupted"
    states = run["states"]
    assert set(states) == {"ok", "pending"}, states  # drained: nothing left sending or possibly billed
    assert states["ok"] == sim.charges()

    # the interrupted run still wrote its Parquet: every line, the unsent ones marked, money exact
    df = pl.read_parquet(job.with_suffix(".parquet"))
    assert df.schema == pl.Schema(SCHEMA)
    assert df.height == 64 and df["line"].to_list() == list(range(1, 65))
    assert (df["status"] == "ok").sum() == states["ok"]
    unsent = df.filter(pl.col("status") == "skipped")
    assert unsent.height == states["pending"] and set(unsent["error_type"]) == {"not_sent"}
    spent = ledger.run(run["id"])["spent_nanos"]
    assert to_nanos(df["price_usd"].sum()) == spent == sim.stats()["charged_nanos"]

    proc = start_runner(sim, job, db, "--concurrency", "8")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert ledger.run(run["id"])["states"] == {"ok": 64}
    assert sim.charges() == 64


def test_a_second_ctrl_c_aborts_and_marks_in_flight_requests_possibly_billed(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    sim = sim_process("5")
    job = tmp_path / "abort.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in lines("x", 20)))
    db = tmp_path / "ledger.db"
    proc = start_runner(sim, job, db, "--max-usd", "1", "--concurrency", "4")
    assert wait_for(lambda: sim.stats()["counters"].get("run.call", 0) >= 4, proc)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    assert time.monotonic() - started < 3, "the second Ctrl-C does not wait for the 5 s replies"
    assert proc.returncode == 4, output
    assert "aborting" in output

    ledger = Ledger(f"sqlite:///{db}")
    run = ledger.runs()[0]
    assert run["states"] == {"possibly_billed": 4, "pending": 16}
    view = ledger.budget_by_id(run["budget_id"])
    assert view.reserved_nanos == 0
    assert view.possibly_billed_nanos > 0
