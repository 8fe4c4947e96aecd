"""A randomized trial of batch mode under SIGKILL: `runner run --mode batch` (a real process) killed
twice at random moments, then run to the end; every trial must keep every invariant.

    uv run python -m benchmarks.batch_kills [--seed 7] [--trials 12]

Per trial: 200 lines in batches of 50 against the simulator in its own process (batches of 1 s; every
third trial's first batch expires at 60 %). Checked: exit 0, every line ok, no batch made twice (the
simulator's batches_created equals the ledger's parts), every custom_id charged once, the simulator's
books equal the ledger's spent. Printed: each trial, then how many kept every invariant.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from runner.ledger import Ledger
from tests.test_processes import KEY, SimProcess

MODEL = "openai/gpt-oss-120b"


def trial(folder: Path, rng: random.Random, expire: bool) -> tuple[bool, str]:
    sim = SimProcess("0")
    try:
        sim.http.post(
            "/_sim/config", json={"batch_duration": 1.0, "batch_expire_fraction": 0.6 if expire else None}
        )
        job = folder / "job.jsonl"
        job.write_text(
            "".join(
                json.dumps({"custom_id": f"b{i}", "model": MODEL, "max_tokens": 60,
                            "messages": [{"role": "user", "content": f"q {i}"}]}) + "\n"
                for i in range(200)
            )
        )  # fmt: skip
        prices = folder / "prices.toml"
        prices.write_text(f'["{MODEL}"]\ninput = 0.10\noutput = 0.50\nbatch_discount = 0.5\n')
        db = f"sqlite:///{folder / 'ledger.db'}"
        env = {**os.environ, "RUNNER_DB": db, "OPENAI_API_KEY": KEY}
        command = [sys.executable, "-m", "runner", "run", str(job), "--provider", "openai", "--base-url",
                   f"{sim.url}/v1", "--price-file", str(prices), "--mode", "batch", "--batch-size", "50",
                   "--max-usd", "1", "-o", str(folder / "out.parquet")]  # fmt: skip
        kills = []
        for _ in range(2):
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait = rng.uniform(0.2, 3.5)
            kills.append(f"{wait:.2f}")
            time.sleep(wait)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        ledger = Ledger(db)
        run = ledger.runs()[0]
        stats = sim.stats()
        charges = Counter(t["customId"] for t in sim.transactions())
        parts = ledger.parts(run.id)
        good = (
            done.returncode == 0
            and run.states == {"ok": 200}
            and len(charges) == 200
            and set(charges.values()) == {1}
            and stats["charged_nanos"] == run.spent_nanos
            and stats["batches_created"] == len(parts)
        )
        most = max(charges.values(), default=0)
        text = (
            f"killed at {', '.join(kills)} s; exit {done.returncode}; {run.states}; "
            f"batches {stats['batches_created']} (parts {len(parts)}); {len(charges)} lines charged, at most "
            f"{most} time(s) each; books {stats['charged_nanos']} = ledger {run.spent_nanos}"
        )
        return good, text
    finally:
        sim.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    kept = 0
    for number in range(args.trials):
        with tempfile.TemporaryDirectory() as folder:
            good, text = trial(Path(folder), rng, expire=number % 3 == 0)
        kept += good
        print(f"trial {number}: {'OK' if good else 'FAILED'}: {text}", flush=True)
    print(f"{kept}/{args.trials} trials kept every invariant")


if __name__ == "__main__":
    main()
