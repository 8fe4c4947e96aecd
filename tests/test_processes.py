"""The runner as a real OS process against the simulator in another: SIGKILL and resume, two runners on
one budget, Ctrl-C. The simulator's own charge ledger is the referee."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from runner.app.export import schema
from runner.core.money import to_nanos
from runner.ledger import Ledger

KEY = "sk-sim-process-test"


class SimProcess:
    """`runner simulator` in its own process, on an ephemeral port."""

    def __init__(self, latency: str) -> None:
        command = [sys.executable, "-m", "runner", "simulator", "--port", "0", "--latency", latency]
        self.proc = subprocess.Popen(
            [*command, "--dry-run-latency", "0.01-0.03"],
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


def url_of(db: Path | str) -> str:
    """A ledger's URL: a SQLite file's path, or a URL as it is (PostgreSQL)."""
    return db if isinstance(db, str) else f"sqlite:///{db}"


def start_runner(
    sim: SimProcess,
    job: Path,
    db: Path | str,
    *args: str,
    session: bool = False,
    preexec: Callable[[], None] | None = None,
    output: Path | None = None,
) -> subprocess.Popen[str]:
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
        str(output or job.with_suffix(".parquet")),
        *args,
    ]
    env = {**os.environ, "RUNNER_DB": url_of(db), "ORTHOGONAL_API_KEY": KEY, "COLUMNS": "200"}
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=job.parent,
        start_new_session=session,  # its own process group, as a terminal's foreground job is
        preexec_fn=preexec,  # noqa: PLW1509 - a resource limit for one test, no threads started yet
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


def quiet(sim: SimProcess, still_s: float = 0.6) -> None:
    """Once the simulator's books stop moving: a request cut off by a process that aborted is still
    served (and charged) by the simulator after its client has gone, and the books are read after."""
    deadline = time.monotonic() + 15
    last, since = sim.stats(), time.monotonic()
    while time.monotonic() - since < still_s and time.monotonic() < deadline:
        time.sleep(0.05)
        now = sim.stats()
        if now != last:
            last, since = now, time.monotonic()


def assert_books_match(ledger: Ledger, sim: SimProcess, job_lines: list[dict[str, Any]], budget: str) -> None:
    """Every request of the (only) run has exactly one settled charge, the simulator's, with its
    response, or is possibly billed (never re-sent, charged at most what it held); the spent total
    equals the simulator's charges to the nano-dollar, possibly-billed rows accounted for."""
    quiet(sim)
    runs = ledger.runs()
    rows = {r["custom_id"]: r for batch in ledger.iter_request_rows(runs[0].id) for r in batch}
    assert len(rows) == len(job_lines)
    by_line = {body_sha(line): line["custom_id"] for line in job_lines}
    charged: dict[str, list[int]] = {}
    for t in sim.transactions():
        charged.setdefault(by_line[t["body_sha256"]], []).append(int(t["amount_nanos"]))
    assert all(len(v) == 1 for v in charged.values()), "a request was paid for twice"
    for custom_id, row in rows.items():
        if row["state"] == "ok":  # exactly one charge, the one the simulator made, and its response
            assert charged[custom_id] == [row["price_nanos"]]
            assert row["content"]
        elif row["error_type"] == "charged_no_answer":  # cut off, and the provider's books say charged
            assert row["state"] == "failed" and row["reconciled"] == "charged"
            assert charged[custom_id] == [row["price_nanos"]]
        elif row["state"] in ("failed", "pending"):  # refused, every retry failed, or never sent
            assert custom_id not in charged
        else:  # unknown outcome: perhaps charged (at most what was held), never re-sent
            assert row["state"] == "possibly_billed", row
            assert sum(charged.get(custom_id, [])) <= row["reserved_nanos"]
            assert row["attempts"] == 1
    paid_but_marked = sum(sum(charged.get(c, [])) for c, r in rows.items() if r["state"] == "possibly_billed")
    view = ledger.budget(budget)
    assert view.reserved_nanos == 0
    assert view.spent_nanos == sum(
        r["price_nanos"] or 0 for r in rows.values() if r["state"] in ("ok", "failed")
    )
    assert view.spent_nanos + paid_but_marked == int(sim.stats()["charged_nanos"])
    assert view.possibly_billed_nanos == sum(
        r["reserved_nanos"] for r in rows.values() if r["state"] == "possibly_billed"
    )
    assert_within_budget(ledger, budget)


def resume_to_done(sim: SimProcess, job: Path, db: Path, run_id: str, n: int, *args: str) -> None:
    """Running the same command again finishes the run: every request paid for once."""
    proc = start_runner(sim, job, db, *args)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert Ledger(f"sqlite:///{db}").run(run_id).states == {"ok": n}
    assert sim.charges() == n


def test_sigkill_at_several_points_then_resume_matches_the_simulators_books(
    tmp_path: Path, sim_process: Callable[[str], SimProcess], ledger_url: str
) -> None:
    sim = sim_process("0.05-0.15")
    job_lines, job, db, ledger = night_job(tmp_path, "k", 240, ledger_url)

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
        if proc.returncode != 4:
            break
    # finished, with the kills' requests in flight possibly billed: exit 5, a code of its own
    assert proc.returncode == 5, output
    assert "possibly billed request(s)" in output
    assert "resuming run" in output

    runs = ledger.runs()
    assert len(runs) == 1, "every restart resumed the same run"
    rows = {r["custom_id"]: r for batch in ledger.iter_request_rows(runs[0].id) for r in batch}
    assert len(rows) == len(job_lines)
    states = Counter(r["state"] for r in rows.values())
    # kills mid-request leave unknown outcomes; each resume resolves them from the provider's charges:
    # charged ones are failed with no answer (paid once), the others are sent again
    assert set(states) <= {"ok", "failed", "possibly_billed"}, states
    assert all(r["error_type"] == "charged_no_answer" for r in rows.values() if r["state"] == "failed")

    assert_books_match(ledger, sim, job_lines, "night")


def test_two_runners_share_one_budget_and_both_stop_at_it(
    tmp_path: Path, sim_process: Callable[[str], SimProcess], ledger_url: str
) -> None:
    sim = sim_process("0.02-0.06")
    db = ledger_url
    ledger = Ledger(db)
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
    done = sum(r.states.get("ok", 0) for r in ledger.runs())
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
    assert run.state == "interrupted"
    states = run.states
    assert set(states) == {"ok", "pending"}, states  # drained: nothing left sending or possibly billed
    assert states["ok"] == sim.charges()

    # the interrupted run still wrote its Parquet: every line, the unsent ones marked, money exact
    df = pl.read_parquet(job.with_suffix(".parquet"))
    assert df.schema == pl.Schema(schema())
    assert df.height == 64 and df["line"].to_list() == list(range(1, 65))
    assert (df["status"] == "ok").sum() == states["ok"]
    unsent = df.filter(pl.col("status") == "skipped")
    assert unsent.height == states["pending"] and set(unsent["error_type"]) == {"not_sent"}
    spent = ledger.run(run.id).spent_nanos
    assert to_nanos(df["price_usd"].sum()) == spent == sim.stats()["charged_nanos"]

    resume_to_done(sim, job, db, run.id, 64, "--concurrency", "8")


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
    assert run.states == {"possibly_billed": 4, "pending": 16}
    view = ledger.budget_by_id(run.budget_id)
    assert view.reserved_nanos == 0
    assert view.possibly_billed_nanos > 0


# ---- one runner against a simulator in another process --------------------------------------


def night_job(
    tmp_path: Path, prefix: str, n: int, url: str | None = None
) -> tuple[list[dict[str, Any]], Path, Any, Ledger]:
    """A job of `n` lines and a ledger (a SQLite file, or `url`) with a $5 budget named "night"."""
    job_lines = lines(prefix, n)
    job = tmp_path / f"{prefix}.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in job_lines))
    db: Path | str = url or tmp_path / "ledger.db"
    ledger = Ledger(url_of(db))
    ledger.create_budget("night", to_nanos(Decimal(5)))
    return job_lines, job, db, ledger


def test_a_402_mid_run_stops_it_within_two_seconds_with_the_reason(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    sim = sim_process("0.02-0.05")
    job = tmp_path / "broke.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in lines("m", 600)))
    db = tmp_path / "ledger.db"
    args = ("--max-usd", "1", "--concurrency", "12")
    proc = start_runner(sim, job, db, *args)
    assert wait_for(lambda: sim.charges() >= 60, proc)
    sim.http.post("/_sim/config", json={"balance": "0"})  # the account runs dry mid-run
    emptied = time.monotonic()
    output, _ = proc.communicate(timeout=30)
    assert time.monotonic() - emptied < 2 + 1, "the run stops within 2 s (plus the export)"
    assert proc.returncode == 4, output
    assert "402" in output or "balance" in output.lower(), output

    ledger = Ledger(f"sqlite:///{db}")
    run = ledger.runs()[0]
    assert run.state == "stopped"
    assert set(run.states) <= {"ok", "pending"}, run.states
    view = ledger.budget_by_id(run.budget_id)
    assert view.reserved_nanos == 0 and view.possibly_billed_nanos == 0
    assert view.spent_nanos == int(sim.stats()["charged_nanos"])
    assert run.states["ok"] == sim.charges() < 600


def test_retries_end_with_each_request_paid_once(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    """429s and 5xx: retried, and each request paid for once."""
    sim = sim_process("0.01-0.03")
    faults = {"fault_rate": 0.2, "fault_kinds": ["429", "500", "503"], "retry_after_s": 0.05}
    sim.http.post("/_sim/config", json=faults)
    job_lines, job, db, ledger = night_job(tmp_path, "f", 300)
    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "12")
    output, _ = proc.communicate(timeout=120)
    states = ledger.runs()[0].states
    # a request fails only if all 6 attempts did (0.2**6 each: about one run in 50 has one), and then
    # the run says so with exit 5
    assert proc.returncode == (5 if states.get("failed") else 0), output
    assert states["ok"] >= 298, states
    assert set(states) <= {"ok", "failed"}, states
    assert_books_match(ledger, sim, job_lines, "night")
    with sqlite3.connect(db) as c:
        (retries,) = c.execute("SELECT count(*) FROM attempts WHERE outcome = 'retry'").fetchone()
    assert retries > 20  # ~20 % of attempts failed, and were tried again
    assert sum(v for k, v in sim.stats()["counters"].items() if k.startswith("fault.")) >= retries


def test_a_line_changed_mid_run_is_an_error_of_the_job(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    """Lines are read two chunks (of 500) ahead of the sending: a line changed beyond that is caught
    before it is sent, and stops the run as an error of the job."""
    sim = sim_process("0.05-0.1")
    job_lines, job, db, ledger = night_job(tmp_path, "e", 2000)
    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "24")
    assert wait_for(lambda: sim.charges() >= 20, proc)
    edited = [{**line, "max_tokens": 61} if i >= 1600 else line for i, line in enumerate(job_lines)]
    job.write_text("".join(json.dumps(line) + "\n" for line in edited))  # same ids, other bodies
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output  # the job is wrong, not the run stopped
    assert "changed since run" in output
    assert "resumable" not in output
    assert_books_match(ledger, sim, job_lines, "night")


def test_an_invalid_job_is_refused_with_the_problems_validate_names(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    """`runner run` names the problems `runner validate` names, exits 1, asks for no dry run and
    leaves no run."""
    sim = sim_process("0.01")
    job_lines, job, db, ledger = night_job(tmp_path, "bad", 300)
    job_lines[120]["temperature"] = 9
    job_lines[250]["custom_id"] = "bad7"
    text = "".join(json.dumps(line) + "\n" for line in job_lines)
    job.write_text(text.replace(json.dumps(job_lines[200]), "{not json", 1))
    env = {**os.environ, "COLUMNS": "200"}
    command = [sys.executable, "-m", "runner", "validate", str(job)]
    validated = subprocess.run(command, capture_output=True, text=True, env=env, cwd=job.parent, check=False)
    named = [line for line in validated.stderr.splitlines() if "bad.jsonl:" in line]
    expected = [line for line in named if "problem(s)" not in line]  # less its total
    proc = start_runner(sim, job, db, "--budget", "night")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output
    said = [line for line in output.splitlines() if "bad.jsonl:" in line]
    assert said == expected
    assert [line.split("bad.jsonl:")[1].split(":")[0] for line in said[:3]] == ["121", "201", "251"]
    assert sim.stats()["counters"].get("run.dry_run", 0) == 0
    assert ledger.runs() == []


def test_ctrl_c_during_the_dry_runs_leaves_no_run(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    """Ctrl-C during the pre-flight (dry runs under way): exit 130, nothing sent, no run left."""
    sim = sim_process("0.05")
    _, job, db, ledger = night_job(tmp_path, "pre", 3000)
    proc = start_runner(sim, job, db, "--budget", "night", session=True)
    assert wait_for(lambda: sim.stats()["counters"].get("run.dry_run", 0) >= 50, proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to the whole foreground group
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    assert sim.stats()["counters"].get("run.call", 0) == 0
    assert ledger.runs() == []


def test_retry_possibly_billed_on_the_first_resume_keeps_what_the_first_attempt_held(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    """SIGKILL with requests in flight, then the first resume with --retry-possibly-billed: those
    requests are sent again, each attempt keeps its row, and what the first attempts held stays
    counted as possibly billed, so spent + possibly billed is never below what the provider charged."""
    sim = sim_process("0.3-0.6")
    _, job, db, ledger = night_job(tmp_path, "p", 200)
    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "64")
    assert wait_for(lambda: sim.charges() >= 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    quiet(sim)  # requests the killed process had sent are still served, and charged

    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "64", "--retry-possibly-billed")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    quiet(sim)
    run = ledger.runs()[0]
    assert run.states == {"ok": 200}
    rows = {r["id"]: r for batch in ledger.iter_request_rows(run.id) for r in batch}
    with sqlite3.connect(db) as c:
        attempts = c.execute("SELECT request_id, number, outcome FROM attempts ORDER BY request_id, number")
        by_request: dict[int, list[tuple[int, str]]] = {}
        for request_id, number, outcome in attempts:
            by_request.setdefault(request_id, []).append((number, outcome))
        kept = dict(
            c.execute("SELECT id, possibly_billed_nanos FROM requests WHERE possibly_billed_nanos > 0")
        )
    assert kept, "the kill left requests in flight"
    for request_id, held in kept.items():  # sent twice: both attempts on record, the first unknown
        assert by_request[request_id] == [(1, "unknown"), (2, "ok")]
        assert rows[request_id]["attempts"] == 2
        assert held == rows[request_id]["quote_nanos"]
    view = ledger.budget("night")
    charged = int(sim.stats()["charged_nanos"])
    assert view.spent_nanos == sum(r["price_nanos"] for r in rows.values())
    assert view.possibly_billed_nanos == sum(kept.values())
    assert view.spent_nanos + view.possibly_billed_nanos >= charged
    # the re-sends carried each request's idempotency key: the simulator answered those it had
    # charged with the reply it kept, so every request is charged exactly once in its books
    keys = Counter(t["idempotencyKey"] for t in sim.transactions())
    assert len(keys) == 200 and set(keys.values()) == {1}
    assert sim.stats()["counters"]["idempotent_replay"] >= 1
    assert view.spent_nanos == charged
    assert_within_budget(ledger, "night")
    # the provider's books then release what the first attempts held
    done = run_cli(db, "reconcile")
    assert done.returncode == 0, done.stdout
    view = ledger.budget("night")
    assert view.possibly_billed_nanos == 0 and view.spent_nanos == charged


def ledger_holds(db: Path | str, text: str) -> bool:
    """Whether the text is anywhere in the ledger: the SQLite file's bytes, or any row of any table."""
    if isinstance(db, Path) or db.startswith("sqlite:///"):
        path = db if isinstance(db, Path) else Path(db.removeprefix("sqlite:///"))
        return text.encode() in path.read_bytes()
    import psycopg  # noqa: PLC0415

    tables = ("budgets", "runs", "requests", "attempts", "ledger_entries", "quotes", "alembic_version")
    with psycopg.connect(db) as conn:
        return any(
            conn.execute(f"SELECT count(*) FROM {t} WHERE {t}::text LIKE %s", (f"%{text}%",)).fetchone()[0]  # type: ignore[index]
            for t in tables
        )


def run_cli(db: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNNER_DB": url_of(db), "ORTHOGONAL_API_KEY": KEY, "COLUMNS": "200"}
    command = [sys.executable, "-m", "runner", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_after_a_kill_reconcile_resolves_every_possibly_billed_request_from_the_providers_charges(
    tmp_path: Path, sim_process: Callable[[str], SimProcess], ledger_url: str
) -> None:
    sim = sim_process("0.3-0.6")
    _, job, db, ledger = night_job(tmp_path, "k", 200, ledger_url)
    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "64")
    assert wait_for(lambda: sim.charges() >= 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    quiet(sim)

    done = run_cli(db, "reconcile", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["method"] == "transactions" and report["agrees"] is True
    assert report["charged"] > 0 and report["charged"] + report["not_charged"] > 0  # the kill cut some off
    assert report["difference_nanos"] == 0
    assert KEY not in done.stdout + done.stderr
    view = ledger.budget("night")
    assert view.possibly_billed_nanos == 0 and view.reserved_nanos == 0
    assert view.spent_nanos == int(sim.stats()["charged_nanos"])  # to the nano-dollar
    run = ledger.runs()[0]
    assert "possibly_billed" not in run.states

    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "64")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 5, output  # the charged ones whose answer was lost are failed
    quiet(sim)
    run = ledger.runs()[0]
    assert run.states == {"ok": 200 - report["charged"], "failed": report["charged"]}
    assert ledger.budget("night").spent_nanos == int(sim.stats()["charged_nanos"])
    assert sim.charges() == 200  # each request charged once
    assert not ledger_holds(db, KEY)
    again = run_cli(db, "reconcile", "--json")  # a finished run reconciled: it stays as it was
    assert again.returncode == 0, again.stdout + again.stderr
    assert ledger.runs()[0].state == "done"


def test_a_provider_that_shows_a_balance_only_is_reconciled_by_its_movement(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    sim = sim_process("0.01")
    sim.http.post("/_sim/config", json={"lists_transactions": False})
    _, job, db, _ = night_job(tmp_path, "b", 30)
    proc = start_runner(sim, job, db, "--budget", "night")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    done = run_cli(db, "reconcile")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "by the balance's movement" in done.stdout and "difference:     +0 nano-USD" in done.stdout
    assert "cannot be attributed per request" in done.stdout
    assert KEY not in done.stdout + done.stderr
    sim.http.post("/_sim/config", json={"balance": "50"})  # moved between runs: not this run's difference
    proc = start_runner(sim, job, db, "--budget", "night", "--new", "--cache", "refresh")
    assert proc.communicate(timeout=120)[0] and proc.returncode == 0
    differs = run_cli(db, "reconcile", "--json")
    assert differs.returncode == 0, differs.stdout  # this run's own movement agrees
    assert json.loads(differs.stdout)["agrees"] is True


def test_a_ledger_that_fills_the_disk_stops_the_run_and_it_resumes_paying_each_request_once(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    """The ledger's files may not grow past 2.5 MB (a full disk, as the process sees it): the run stops
    with the reason (exit 4, no traceback), and the same command without the limit finishes it."""
    sim = sim_process("0.01-0.03")
    job_lines = [
        {**line, "messages": [{"role": "user", "content": f"q {i} " + "x" * 300}]}
        for i, line in enumerate(lines("d", 2000))
    ]
    job = tmp_path / "d.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in job_lines))
    db = tmp_path / "ledger.db"
    ledger = Ledger(f"sqlite:///{db}")
    ledger.create_budget("night", to_nanos(Decimal(5)))

    def full_at_two_megabytes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, 2_500_000))

    proc = start_runner(
        sim, job, db, "--budget", "night", "--concurrency", "32", preexec=full_at_two_megabytes
    )
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 4, output
    assert f"the ledger {db} cannot be used" in output and "run the same command again" in output
    assert "Traceback" not in output
    assert 0 < sim.charges() < 2000
    quiet(sim)

    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "32")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode in (0, 5), output  # 5: requests in flight when the ledger failed
    assert "resuming run" in output
    assert_books_match(ledger, sim, job_lines, "night")


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_ledger_deleted_or_replaced_during_a_run_stops_it_and_nothing_is_paid_twice(
    tmp_path: Path, sim_process: Callable[[str], SimProcess], change: str
) -> None:
    """What the run recorded lives on in its open connections: it is saved back to the ledger's path
    (or beside a file that took its place), the run stops (exit 4), and resuming from the saved copy
    sends only what was never sent."""
    sim = sim_process("0.1-0.2")
    job_lines, job, db, _ = night_job(tmp_path, "g", 600)
    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "16")
    assert wait_for(lambda: sim.charges() >= 60, proc)
    db.unlink()
    if change == "replaced":
        other = sqlite3.connect(db)
        other.execute("CREATE TABLE unrelated (x)")
        other.close()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 4, output
    assert f"the ledger file {db} was {change} during run" in output
    assert "Traceback" not in output
    run_id = output.split(f"was {change} during run ")[1].split(":")[0]
    saved = db if change == "deleted" else Path(f"{db}.saved-{run_id}")
    assert f"saved to {saved}" in output
    assert "to resume to resume" not in " ".join(output.split())  # said once
    assert sim.charges() < 600
    quiet(sim)
    proc = start_runner(sim, job, saved, "--budget", "night", "--concurrency", "16")  # as it says
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode in (0, 5), output
    assert "resuming run" in output
    assert_books_match(Ledger(f"sqlite:///{saved}"), sim, job_lines, "night")


def test_a_reader_that_goes_away_never_stops_the_run_before_it_drains_and_writes_its_parquet(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    """`runner run … | head`, or `| tee log` ended by the same Ctrl-C: the output's reader is gone,
    and the run carries on to its end, its Parquet written."""
    sim = sim_process("0.05-0.1")
    job_lines, job, db, ledger = night_job(tmp_path, "h", 300)
    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "16")
    assert proc.stdout is not None
    proc.stdout.read(10)
    proc.stdout.close()  # every later write of the runner meets a closed pipe
    assert proc.wait(timeout=60) == 0
    assert ledger.runs()[0].state == "done"
    assert pl.read_parquet(job.with_suffix(".parquet")).height == 300
    assert_books_match(ledger, sim, job_lines, "night")


def test_a_pre_flight_killed_half_way_does_not_ask_its_dry_runs_again(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    """Quotes are kept in the ledger chunk by chunk as they come: after SIGKILL in the pre-flight, the
    next run asks only what was not answered yet."""
    sim = sim_process("0.01")
    job_lines, job, db, ledger = night_job(tmp_path, "q", 4000)
    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "100")
    assert wait_for(lambda: sim.stats()["counters"].get("run.dry_run", 0) >= 2000, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    asked_before = sim.stats()["counters"]["run.dry_run"]
    assert sim.charges() == 0
    quiet(sim)
    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "100")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    asked_in_all = sim.stats()["counters"]["run.dry_run"]
    assert asked_in_all - asked_before <= 4000 - asked_before + 1200  # at most what was in flight again
    assert asked_in_all < 4000 + 1200
    assert_books_match(ledger, sim, job_lines, "night")


def test_pages_of_the_ledger_and_its_wal_overwritten_during_a_run_are_noticed(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    """Garbage written over the middle of the ledger's file and of its WAL while a run sends: the run
    never ends "done" (it ran on: it said so); it stops with exit 4 naming the damage and the remedy."""
    sim = sim_process("0.05-0.1")
    _, job, db, ledger = night_job(tmp_path, "w", 400)
    ledger.close()
    proc = start_runner(sim, job, db, "--budget", "night", "--concurrency", "16")
    assert wait_for(lambda: sim.charges() >= 150, proc)
    # every page of the file but the first (the schema), and the second half of the WAL: the tables
    # no write touches again (the migrations', the quotes') stay garbage whatever is checkpointed
    for path, start in ((Path(db), 4096), (Path(f"{db}-wal"), Path(f"{db}-wal").stat().st_size // 2)):
        size = path.stat().st_size
        with path.open("r+b") as handle:
            handle.seek(start)
            handle.write(b"\x07" * (size - start))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 4, output
    assert ": done" not in output
    assert "damaged" in output or "malformed" in output, output
    assert "Traceback" not in output
