"""One run sent by 1, 2 and 4 worker processes on one PostgreSQL ledger, at real latency.

    uv run python -m benchmarks.workers [--requests 20000] [--latency 2] [--concurrency 2000]
                                        [--workers 1,2,4] [--db postgresql://…]

The night-scale case (benchmarks/latency.py) with the run's work shared by several `runner run`
processes started together on the same job and ledger (as on several machines): the concurrency is
the run's, shared by its workers. Measured in the same run, against the same simulator process:
- the baseline, a bare aiohttp loop with the same concurrency (req/s);
- for each number of workers: the run phase (first request sent to last one settled, from the
  ledger), the wall clock from the workers' start to the last one's exit, and their CPU seconds;
  each printed as a ratio against the baseline.
Without --db a throwaway PostgreSQL cluster is started (Debian's package, as the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.latency import Simulator, bare_loop, body, timed


@contextmanager
def databases(url: str | None) -> Iterator[Any]:
    """A function that makes a fresh database per case: on the server given, or a throwaway one."""
    if url is not None:
        counter = iter(range(10**6))

        def fresh() -> str:
            name = f"runner_bench_{os.getpid()}_{next(counter)}"
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            return url.rsplit("/", 1)[0] + f"/{name}"

        yield fresh
        return
    from tests.postgres import PostgresServer  # noqa: PLC0415 - the tests' throwaway cluster

    server = PostgresServer()
    try:
        yield server.new_database
    finally:
        server.stop()


def phases(url: str) -> tuple[float, int]:
    """(run phase seconds, requests ok) from the ledger."""
    with psycopg.connect(url) as conn:
        first, last = conn.execute("SELECT min(started_at), max(finished_at) FROM requests").fetchone()
        (ok,) = conn.execute("SELECT count(*) FROM requests WHERE state = 'ok'").fetchone()
    return (last - first).total_seconds(), int(ok)


def run_workers(
    sim: Simulator, url: str, n: int, concurrency: int, workers: int, folder: Path
) -> dict[str, float]:
    job = folder / f"job-{workers}.jsonl"
    job.write_text("".join(json.dumps({"custom_id": f"r{i}", **body(i)}) + "\n" for i in range(n)))
    env = {**os.environ, "RUNNER_DB": url, "ORTHOGONAL_API_KEY": "bench", "COLUMNS": "200"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # byte code cached, as on a user's machine
    subprocess.run([sys.executable, "-m", "runner", "--help"], env=env, capture_output=True, check=True)
    subprocess.run(
        [sys.executable, "-m", "runner", "budget", "create", "bench", "--limit", "1000"],
        env=env,
        capture_output=True,
        check=True,
    )
    command = [sys.executable, "-m", "runner", "run", str(job), "--provider", "orthogonal"]
    command += ["--base-url", sim.url, "--concurrency", str(concurrency), "--budget", "bench"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*command, "-o", str(folder / f"out-{workers}-{i}.parquet")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(workers)
    ]
    outputs = [p.communicate()[0] for p in procs]
    whole = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            sys.exit(f"a worker failed ({p.returncode}):\n{out[-3000:]}")
    run_s, ok = phases(url)
    if ok != n:
        sys.exit(f"{ok} of {n} requests answered")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"run_s": run_s, "whole_s": whole, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--dry-run-latency", default="0.2")
    parser.add_argument("--db", default=None, help="a PostgreSQL server's URL (a database is made per case)")
    args = parser.parse_args()
    n, c = args.requests, args.concurrency
    counts = [int(x) for x in args.workers.split(",")]
    print(
        f"{n:,} calls, latency {args.latency:g} s (dry runs {args.dry_run_latency} s), run concurrency {c:,}"
    )
    sim = Simulator(args.latency, args.dry_run_latency)
    try:
        with tempfile.TemporaryDirectory() as tmp, databases(args.db) as fresh:
            loop_s, loop_cpu = timed(bare_loop(sim.url, "orthogonal", n, c))
            loop_rate = n / loop_s
            print(f"  bare aiohttp loop   {loop_rate:8,.0f} req/s  {loop_cpu:6.1f} s CPU")
            for workers in counts:
                result = run_workers(sim, fresh(), n, c, workers, Path(tmp))
                run_rate, whole_rate = n / result["run_s"], n / result["whole_s"]
                cpu = result["cpu_s"]
                print(
                    f"  {workers} worker(s): run phase {run_rate:7,.0f} req/s = "
                    f"{run_rate / loop_rate:.2f} x the loop; whole {whole_rate:6,.0f} req/s = "
                    f"{whole_rate / loop_rate:.2f} x ({result['whole_s']:.1f} s); "
                    f"CPU {cpu:.1f} s = {cpu / loop_cpu:.2f} x the loop's",
                    flush=True,
                )
    finally:
        sim.close()


if __name__ == "__main__":
    main()
