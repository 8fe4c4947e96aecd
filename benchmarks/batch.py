"""Batch mode: `runner run --mode batch` against the simulator's Batch API (its own process), vs a bare
aiohttp loop doing the same Batch API steps in the same run.

    uv run python benchmarks/batch.py [--lines 20000] [--batch-size 10000] [--duration 10]

The loop uploads each part's file, makes its batch, looks at it every second until it ends, and reads
its output file line by line: what any client of the Batch API must do. runner does that and holds
every line before its upload, records each step, settles every line in the ledger and writes the
Parquet. Printed: wall-clock seconds of both, runner's as a ratio of the loop's, and runner's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

MODEL = "openai/gpt-oss-120b"
KEY = "bench"


def _line(i: int, prefix: str) -> dict[str, object]:
    return {
        "custom_id": f"{prefix}{i}",
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": f"batch question {prefix} {i}"}],
    }


async def bare_loop(url: str, lines: int, size: int) -> float:
    """The Batch API steps with nothing else: upload, create, poll each second, read the output."""
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        batches = []
        for first in range(0, lines, size):
            content = "".join(
                json.dumps(
                    {
                        "custom_id": f"l{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {k: v for k, v in _line(i, "l").items() if k != "custom_id"},
                    }
                )
                + "\n"
                for i in range(first, min(lines, first + size))
            ).encode()
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", content, filename="part.jsonl")
            async with session.post(f"{url}/v1/files", data=form) as reply:
                file_id = (await reply.json())["id"]
            body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            async with session.post(f"{url}/v1/batches", json=body) as reply:
                batches.append((await reply.json())["id"])
        answered = 0
        for batch_id in batches:
            while True:
                async with session.get(f"{url}/v1/batches/{batch_id}") as reply:
                    state = await reply.json()
                if state["status"] in ("completed", "failed", "expired", "cancelled"):
                    break
                await asyncio.sleep(1.0)
            async with session.get(f"{url}/v1/files/{state['output_file_id']}/content") as reply:
                async for raw in reply.content:
                    if raw.strip():
                        answered += json.loads(raw)["response"]["status_code"] == 200
    assert answered == lines, answered
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds a batch takes")
    args = parser.parse_args()
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner",
            "simulator",
            "--port",
            "0",
            "--latency",
            "0",
            "--batch-duration",
            f"{args.duration:g}",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert sim.stdout is not None
        url = sim.stdout.readline().split("listening on ")[1].split()[0]
        loop_s = asyncio.run(bare_loop(url, args.lines, args.batch_size))
        with tempfile.TemporaryDirectory() as folder:
            job = Path(folder) / "job.jsonl"
            job.write_text("".join(json.dumps(_line(i, "r")) + "\n" for i in range(args.lines)))
            prices = Path(folder) / "prices.toml"
            prices.write_text(f'["{MODEL}"]\ninput = 0.10\noutput = 0.50\nbatch_discount = 0.5\n')
            env = {**os.environ, "RUNNER_DB": f"sqlite:///{folder}/ledger.db", "OPENAI_API_KEY": KEY}
            command = [
                sys.executable,
                "-m",
                "runner",
                "run",
                str(job),
                "--provider",
                "openai",
                "--base-url",
                f"{url}/v1",
                "--price-file",
                str(prices),
                "--mode",
                "batch",
                "--batch-size",
                str(args.batch_size),
                "--max-usd",
                "100",
                "-o",
                f"{folder}/out.parquet",
            ]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runner_s = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    finally:
        sim.kill()
        sim.wait()
    print(f"{args.lines:,} lines in batches of {args.batch_size:,}, each taking {args.duration:g} s")
    print(f"bare Batch API loop: {loop_s:.1f} s")
    print(
        f"runner run --mode batch (whole command): {runner_s:.1f} s = {runner_s / loop_s:.2f} x the loop; "
        f"CPU {cpu:.1f} s ({cpu / args.lines * 1e6:.0f} us per line)"
    )


if __name__ == "__main__":
    main()
