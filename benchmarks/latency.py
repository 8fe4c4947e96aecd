"""The real workload: many calls in flight, each taking seconds, against the simulator in its own process.

    uv run python benchmarks/latency.py [--requests 20000] [--latency 2] [--concurrency 2000]
                                        [--provider orthogonal|openai] [--rounds 1]
                                        [--dry-run-latency 0.05-0.2] [--tuned-loops]

Measured in the same run, against the same simulator process (`runner simulator --latency S`):
- the baseline: a bare aiohttp loop (one session, a pool as large as the concurrency, as many
  workers) posting the same chat bodies the runner sends, its wall clock and CPU seconds;
- with the Run API, the same loop making the dry runs of those bodies (the pre-flight's network
  work): the runner's CPU is given against the call loop's and against both loops' (the runner makes
  both HTTP exchanges for every line; the call loop only one);
- `runner run` in its own process with the same concurrency: the run phase (from the first request
  sent to the last one settled, read from the ledger's timestamps), the whole command's wall clock
  (start-up, validation, quotes, run, Parquet, report), and its CPU seconds (user + sys).
Each figure is printed beside the baseline's as a ratio. The simulator must not be the bottleneck:
its own CPU seconds are printed too. The loops run with Python's default cycle collector settings;
`--tuned-loops` times them again with the setting the runner's CLI makes, to show what it is worth.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from runner.cli.console import GC_YOUNGEST
from runner.simulator import parse_latency

MODEL = "openai/gpt-oss-120b"


def body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": f"question {i}"}]}


class Simulator:
    def __init__(self, latency: float, dry_run_latency: str) -> None:
        command = [sys.executable, "-m", "runner", "simulator", "--port", "0", "--latency", str(latency)]
        command += ["--dry-run-latency", dry_run_latency]
        command += ["--balance", "1000000"]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"}
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.url = line.split("listening on ")[1].split()[0]

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def bare_loop(url: str, provider: str, n: int, concurrency: int, *, dry_run: bool = False) -> float:
    """The baseline: `concurrency` workers over one aiohttp session; returns seconds. With dry_run,
    the Run API's dry runs of the same bodies (the pre-flight's network work)."""
    if provider == "orthogonal":
        target = f"{url}/v1/run"

        def payload(i: int) -> dict[str, Any]:
            envelope = {"api": "baseten", "path": "/v1/chat/completions", "body": body(i)}
            return {**envelope, "dryRun": True} if dry_run else envelope
    else:
        target = f"{url}/v1/chat/completions"
        payload = body
    headers = {"Authorization": "Bearer bench"}
    counter = iter(range(n))
    ok = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        for i in counter:
            async with session.post(target, json=payload(i), headers=headers) as reply:
                data = await reply.json()
                ok += reply.status == 200 and bool(data)

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    assert ok == n, f"the bare loop got {ok} of {n} replies"
    return elapsed


def phases_s(db: Path) -> tuple[float, float]:
    """(pre-flight, run phase) seconds from the ledger: the run is made when quoting starts, its
    first request is sent when quoting is over."""
    with sqlite3.connect(db) as c:
        (made,) = c.execute("SELECT created_at FROM runs").fetchone()
        first, last = c.execute("SELECT min(started_at), max(finished_at) FROM requests").fetchone()
    start, sent, done = (datetime.fromisoformat(t) for t in (made, first, last))
    return (sent - start).total_seconds(), (done - sent).total_seconds()


def runner_run(sim: Simulator, provider: str, n: int, concurrency: int, folder: Path) -> dict[str, float]:
    job = folder / "job.jsonl"
    job.write_text("".join(json.dumps({"custom_id": f"r{i}", **body(i)}) + "\n" for i in range(n)))
    db = folder / f"ledger-{time.monotonic_ns()}.db"
    base = sim.url if provider == "orthogonal" else f"{sim.url}/v1"
    command = [sys.executable, "-m", "runner", "run", str(job), "--provider", provider, "--base-url", base]
    command += ["--concurrency", str(concurrency), "--max-usd", "1000", "-o", str(folder / "out.parquet")]
    env = {
        **os.environ,
        "RUNNER_DB": f"sqlite:///{db}",
        "ORTHOGONAL_API_KEY": "bench",
        "OPENAI_API_KEY": "bench",
        "COLUMNS": "200",
    }
    # as on a user's machine, byte code is cached and the ledger exists before the timed command (an
    # untimed `budget list` makes it; a new ledger's first command adds ~0.3 s of CPU for its tables)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    warm_up = [sys.executable, "-m", "runner", "budget", "list"]
    subprocess.run(warm_up, env=env, capture_output=True, check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    whole = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"runner run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    preflight, run = phases_s(db)
    return {"whole_s": whole, "run_s": run, "preflight_s": preflight, "cpu_s": cpu}


def timed(work: Any) -> tuple[float, float]:
    """(wall seconds the coroutine reports, CPU seconds of this process meanwhile)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = asyncio.run(work)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def tuned_loops_cpu(url: str, provider: str, n: int, c: int, *, dry: bool) -> float:
    """The bare loops' CPU seconds (the call loop's, plus the dry-run loop's when `dry`) with the
    cycle collector set as `runner` sets it: what that setting alone is worth to a loop."""
    before = gc.get_threshold()
    gc.set_threshold(GC_YOUNGEST, *before[1:])
    try:
        cpu = timed(bare_loop(url, provider, n, c))[1]
        if dry:
            cpu += timed(bare_loop(url, provider, n, c, dry_run=True))[1]
    finally:
        gc.set_threshold(*before)
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=2000)
    parser.add_argument("--provider", choices=["orthogonal", "openai"], default="orthogonal")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dry-run-latency", default="0.05-0.2", help="the simulator's (its default)")
    parser.add_argument(
        "--tuned-loops",
        action="store_true",
        help="also time the bare loops with the collector setting of `runner` (cli.console.GC_YOUNGEST)",
    )
    args = parser.parse_args()
    n, c = args.requests, args.concurrency
    print(
        f"{n:,} calls, simulator latency {args.latency:g} s (dry runs {args.dry_run_latency} s), "
        f"concurrency {c:,}, provider {args.provider}"
    )
    print(f"ceiling: {c / args.latency:,.0f} req/s (concurrency / latency)")
    sim = Simulator(args.latency, args.dry_run_latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(1, args.rounds + 1):
                sim_cpu = sim.cpu_s()
                loop_s, loop_cpu = timed(bare_loop(sim.url, args.provider, n, c))
                loop_sim_cpu, sim_cpu = sim.cpu_s() - sim_cpu, sim.cpu_s()
                dry = args.provider == "orthogonal"  # the Run API's quotes are dry runs over the network
                dry_s, dry_cpu = (
                    timed(bare_loop(sim.url, args.provider, n, c, dry_run=True)) if dry else (0, 0)
                )
                sim_cpu = sim.cpu_s()
                runner = runner_run(sim, args.provider, n, c, Path(tmp))
                runner_sim_cpu = sim.cpu_s() - sim_cpu
                loop_rate = n / loop_s
                print(f"round {round_}:")
                print(
                    f"  bare aiohttp loop    {loop_rate:8,.0f} req/s  {loop_cpu:6.1f} s CPU "
                    f"({1000 * loop_cpu / n:.2f} s per 1,000)   simulator {loop_sim_cpu:.1f} s CPU"
                )
                if dry:
                    print(f"  bare dry-run loop    {dry_s:8.1f} s      {dry_cpu:6.1f} s CPU")
                run_rate, whole_rate = n / runner["run_s"], n / runner["whole_s"]
                print(
                    f"  runner, run phase    {run_rate:8,.0f} req/s  = {run_rate / loop_rate:.2f} x the loop"
                )
                whole_ratio, cpu = whole_rate / loop_rate, runner["cpu_s"]
                high = parse_latency(args.dry_run_latency)
                ideal = n * (high[1] if high[0] == "fixed" else (high[1] + high[2]) / 2) / c
                if dry:
                    print(
                        f"  runner, pre-flight   {runner['preflight_s']:8.1f} s      = "
                        f"{runner['preflight_s'] / ideal:.2f} x N x dry-run latency / concurrency, "
                        f"{runner['preflight_s'] / dry_s:.2f} x the dry-run loop"
                    )
                else:  # quotes from the price table: no dry runs, no network
                    print(f"  runner, pre-flight   {runner['preflight_s']:8.1f} s      (price table)")
                print(
                    f"  runner, whole command{whole_rate:8,.0f} req/s  = {whole_ratio:.2f} x the loop"
                    f"  ({runner['whole_s']:.1f} s)"
                )
                print(
                    f"  runner CPU           {cpu:8.1f} s     = {cpu / loop_cpu:.2f} x the loop's "
                    f"({1000 * cpu / n:.2f} s per 1,000)"
                    + (f", {cpu / (loop_cpu + dry_cpu):.2f} x both loops'" if dry else "")
                    + f"   simulator {runner_sim_cpu:.1f} s CPU"
                )
                if args.tuned_loops:
                    tuned = tuned_loops_cpu(sim.url, args.provider, n, c, dry=dry)
                    print(
                        f"  the loops with the runner's collector setting: {tuned:.1f} s CPU; "
                        f"runner CPU = {cpu / tuned:.2f} x theirs"
                    )
    finally:
        sim.close()


if __name__ == "__main__":
    main()
