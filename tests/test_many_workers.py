"""One run sent by several worker processes (as if on several machines) from one ledger, against one
simulator in another process: the simulator's books are the referee."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from runner.ledger import Ledger
from tests.postgres import PostgresServer
from tests.test_processes import (
    KEY,
    SimProcess,
    assert_books_match,
    assert_within_budget,
    night_job,
    quiet,
    start_runner,
    url_of,
)


def _estimate(sim: SimProcess, job: Path, db: Path | str) -> None:
    """The dry runs, asked once and kept in the ledger: the workers' pre-flights read them from there."""
    command = [sys.executable, "-m", "runner", "estimate", str(job), "--provider", "orthogonal"]
    env = {**os.environ, "RUNNER_DB": url_of(db), "ORTHOGONAL_API_KEY": KEY}
    subprocess.run([*command, "--base-url", sim.url], env=env, check=True, capture_output=True, timeout=120)


def _workers(
    sim: SimProcess, job: Path, db: Path | str, count: int, *args: str
) -> list[subprocess.Popen[str]]:
    return [
        start_runner(sim, job, db, "--budget", "night", *args, output=job.with_name(f"w{i}.parquet"))
        for i in range(count)
    ]


def _only_run(ledger: Ledger) -> str:
    [run] = ledger.runs()
    return run.id


def test_four_workers_on_postgresql_send_one_run_each_request_paid_once_at_the_shared_rpm(
    tmp_path: Path, sim_process: Callable[[str], SimProcess], postgres: PostgresServer
) -> None:
    sim = sim_process("0.05-0.15")
    job_lines, job, db, ledger = night_job(tmp_path, "w", 4000, postgres.new_database())
    _estimate(sim, job, db)
    rpm = 9000
    procs = _workers(sim, job, db, 4, "--concurrency", "64", "--rpm", str(rpm))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    run_id = _only_run(ledger)
    # each says the run is done, or (one that left while the others still sent) that they finish it
    assert all(f"run {run_id}: done" in out or "other workers finish it" in out for out in outputs), outputs
    assert ledger.run(run_id).states == {"ok": 4000}
    assert ledger.run(run_id).state == "done"
    crew = ledger.workers(run_id)
    assert len(crew) == 4 and all(w.state == "left" for w in crew)
    assert sum(w.sent for w in crew) == 4000
    assert all(w.sent > 0 for w in crew), [w.sent for w in crew]  # every worker took a share
    assert_within_budget(ledger, "night")
    assert_books_match(ledger, sim, job_lines, "night")  # charged exactly once each

    # the sent rate, once every worker has joined, against the one --rpm they share: the slope of
    # the count of charges against their times (a least-squares fit: the batches in which workers
    # take their share of the bucket make a window's edges jitter)
    sends = sorted(float(t["at"]) for t in sim.transactions())
    times = [t for t in sends if sends[0] + 3 <= t < sends[-1] - 1]
    mean_t, mean_i = sum(times) / len(times), (len(times) - 1) / 2
    slope = sum((t - mean_t) * (i - mean_i) for i, t in enumerate(times)) / sum(
        (t - mean_t) ** 2 for t in times
    )
    rate = slope * 60
    assert 0.97 * rpm <= rate <= rpm, f"{rate:.0f}/min against --rpm {rpm}"


def test_a_worker_killed_mid_run_leaves_its_share_to_the_others_and_nothing_is_paid_twice(
    tmp_path: Path, sim_process: Callable[[str], SimProcess], postgres: PostgresServer
) -> None:
    sim = sim_process("0.2-0.4")
    job_lines, job, db, ledger = night_job(tmp_path, "k", 1600, postgres.new_database())
    _estimate(sim, job, db)
    procs = _workers(sim, job, db, 4, "--concurrency", "64")
    deadline = time.monotonic() + 60
    while sim.charges() < 400 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = procs[1]
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    outputs = [p.communicate(timeout=120)[0] for p in procs if p is not victim]
    codes = [p.returncode for p in procs if p is not victim]
    assert set(codes) <= {0, 5}, outputs  # 5: the run ends with the killed worker's possibly billed ones

    run_id = _only_run(ledger)
    info = ledger.run(run_id)
    assert info.state == "done"
    assert set(info.states) <= {"ok", "possibly_billed"}, info.states
    crew = {w.id: w for w in ledger.workers(run_id)}
    gone = [w for w in crew.values() if w.state == "gone"]
    assert len(gone) == 1 and gone[0].pid == victim.pid
    with ledger.reading() as c:  # what was in flight when it died is possibly billed, never sent again
        held = Counter(
            worker
            for worker, state in c.execute(
                "SELECT worker_id, state FROM requests WHERE run_id = ?", (run_id,)
            )
            if state == "possibly_billed"
        )
    assert set(held) <= {gone[0].id}
    assert_within_budget(ledger, "night")
    assert_books_match(ledger, sim, job_lines, "night")
    # --concurrency 64 is the run's: the four workers together never had more calls in flight
    assert 32 < sim.stats()["peak_in_flight"] <= 64, sim.stats()["peak_in_flight"]


def test_two_workers_on_one_sqlite_ledger_share_a_run(
    tmp_path: Path, sim_process: Callable[[str], SimProcess]
) -> None:
    sim = sim_process("0.2-0.4")
    job_lines, job, db, ledger = night_job(tmp_path, "s", 1500)
    procs = _workers(sim, job, db, 2, "--concurrency", "32")
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    run_id = _only_run(ledger)
    assert ledger.run(run_id).states == {"ok": 1500}
    crew = ledger.workers(run_id)
    assert len(crew) == 2 and all(w.sent > 0 for w in crew), [w.sent for w in crew]
    assert sum(w.sent for w in crew) == 1500
    quiet(sim)
    assert_books_match(ledger, sim, job_lines, "night")
