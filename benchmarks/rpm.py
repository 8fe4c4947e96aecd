"""Rate limit: `runner run --rpm 600` against the simulator; the send rate it keeps.

    uv run python benchmarks/rpm.py [--rpm 600] [--window 30]

The runner runs as its own process (the real CLI); the simulator runs here and timestamps every call
it receives. Printed: the rate over the measured window after the first seconds (target: within the
limit and above 97 % of it), and the most calls seen in any sliding 60-second span (target: <= rpm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from runner.simulator import Books, SimulatorThread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rpm", type=float, default=600)
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds skipped at the start")
    args = parser.parse_args()
    per_second = args.rpm / 60
    # enough requests for warm-up + window + a tail, and for a full 60 s span when the window allows
    n = int(per_second * (args.warmup + max(args.window, 60) + 5))
    with tempfile.TemporaryDirectory() as folder, SimulatorThread(Books()) as sim:
        job = Path(folder) / "rpm.jsonl"
        with job.open("w") as handle:
            for i in range(n):
                body = {
                    "custom_id": f"r{i}",
                    "model": "openai/gpt-oss-120b",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": f"rate question {i}"}],
                }
                handle.write(json.dumps(body) + "\n")
        env = {**os.environ, "RUNNER_DB": f"sqlite:///{folder}/ledger.db", "ORTHOGONAL_API_KEY": "bench"}
        command = [sys.executable, "-m", "runner", "run", str(job), "--provider", "orthogonal"]
        command += ["--base-url", sim.base_url, "--max-usd", "10", "--rpm", f"{args.rpm:g}"]
        command += ["--concurrency", "64", "--output", f"{folder}/out.parquet"]
        print(f"{n} requests at --rpm {args.rpm:g} (about {n / per_second:.0f} s) ...", flush=True)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        sends = sorted(float(t["at"]) for t in sim.books.transactions)
    assert len(sends) == n, f"{len(sends)} of {n} calls charged"
    start = sends[0] + args.warmup
    end = start + args.window
    in_window = sum(1 for t in sends if start <= t < end)
    rate = in_window / args.window * 60
    busiest, j = 0, 0
    for i, t in enumerate(sends):  # the most sends inside any 60-second span
        while sends[j] <= t - 60:
            j += 1
        busiest = max(busiest, i - j + 1)
    span = sends[-1] - sends[0]
    print(f"window {args.window:g} s after {args.warmup:g} s: {in_window} sends = {rate:.1f}/min")
    print(f"  {rate / args.rpm:.1%} of the {args.rpm:g}/min limit (target: >= 97 % and <= 100 %)")
    print(f"busiest 60 s span: {busiest} sends (limit {args.rpm:g}); whole run {n} sends in {span:.1f} s")


if __name__ == "__main__":
    main()
