"""The pre-flight at several concurrencies: when the network is the limit, and when the CPU is.

    uv run python -m benchmarks.preflight [--requests 20000] [--dry-run-latency 0.2]
                                          [--concurrency 250,500,1000,2000]

For each concurrency, against one simulator process whose dry runs take --dry-run-latency seconds
(its calls 0.05 s, so that the run after the pre-flight is short), measured in the same run:
- the ideal: N x the dry-run latency / the concurrency (every dry run back-to-back in every slot);
- a bare aiohttp loop making the same N dry runs at that concurrency (the network work alone);
- the same loop split over two processes (half the dry runs and half the concurrency each): what
  spreading the pre-flight over this machine's cores could give;
- `runner run`'s pre-flight, from the run's creation to its first request sent (from the ledger):
  dry runs, the quote cache, the ledger's rows, the budget check.
Each printed as a ratio against the ideal and the loop. While N / ideal is more dry runs a second
than the machine's cores can make and answer (the simulator shares them), even the bare loop is
slower than the ideal: the loops' ratios say what the machine allows, the runner's against the loop
what the runner adds.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.latency import Simulator, bare_loop, runner_run, timed


def _loop_part(url: str, n: int, concurrency: int) -> float:
    return asyncio.run(bare_loop(url, "orthogonal", n, concurrency, dry_run=True))


def split_loop_s(url: str, n: int, concurrency: int, processes: int = 2) -> float:
    """Wall seconds of `processes` bare dry-run loops sharing the N dry runs and the concurrency,
    from their start together (the processes are started and warmed before)."""
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_loop_part, [url] * processes, [processes] * processes, [1] * processes))
        started = time.perf_counter()
        parts = [n // processes] * processes
        list(pool.map(_loop_part, [url] * processes, parts, [concurrency // processes] * processes))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--dry-run-latency", type=float, default=0.2)
    parser.add_argument("--concurrency", default="250,500,1000,2000")
    args = parser.parse_args()
    n, latency = args.requests, args.dry_run_latency
    print(f"{n:,} dry runs of {latency:g} s each, then {n:,} calls of 0.05 s; provider orthogonal")
    print(
        f"{'concurrency':>11} {'ideal':>7} {'bare loop':>17} {'2 bare loops':>17} {'runner pre-flight':>29}"
    )
    sim = Simulator(0.05, str(latency))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for c in (int(x) for x in args.concurrency.split(",")):
                ideal = n * latency / c
                loop_s, _ = timed(bare_loop(sim.url, "orthogonal", n, c, dry_run=True))
                split_s = split_loop_s(sim.url, n, c)
                figures = runner_run(sim, "orthogonal", n, c, Path(tmp))
                runner_s = figures["preflight_s"]
                print(
                    f"{c:>11,} {ideal:6.1f}s {loop_s:6.1f}s = {loop_s / ideal:.2f} x ideal"
                    f" {split_s:6.1f}s = {split_s / ideal:.2f} x ideal"
                    f" {runner_s:6.1f}s = {runner_s / ideal:.2f} x ideal, {runner_s / loop_s:.2f} x loop",
                    flush=True,
                )
    finally:
        sim.close()


if __name__ == "__main__":
    main()
