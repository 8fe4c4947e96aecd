"""Validation throughput: generate a job of N lines, validate it, print lines/s and peak RSS.

    uv run python benchmarks/validate.py [--lines 1000000]

The baseline in the same run is a bare `json.loads` over the same file, so the ratio tells what
validation costs on top of parsing.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from runner.core.jobs import validate_job

MODELS = [
    "openai/gpt-oss-120b",
    "deepseek-ai/DeepSeek-V3.1",
    "zai-org/GLM-4.6",
    "moonshotai/Kimi-K2.5",
]


def generate(path: Path, lines: int) -> None:
    with path.open("w") as handle:
        for i in range(lines):
            body = {
                "custom_id": f"req-{i}",
                "model": MODELS[i % len(MODELS)],
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {
                        "role": "user",
                        "content": f"Summarise item {i} of the catalogue in one line.",
                    },
                ],
                "max_tokens": 64,
                "temperature": 0.2,
                "metadata": {"row": i},
            }
            handle.write(json.dumps(body) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        generate(path, args.lines)
        size_mb = path.stat().st_size / 1e6
        rss_before = peak_rss_mb()

        start = time.perf_counter()
        with path.open("rb") as handle:
            for raw in handle:
                json.loads(raw)
        baseline = args.lines / (time.perf_counter() - start)

        start = time.perf_counter()
        summary = validate_job(path)
        elapsed = time.perf_counter() - start
        assert summary.ok and summary.requests == args.lines, summary.issues[:3]
        rate = args.lines / elapsed
        print(f"job: {args.lines:,} lines, {size_mb:.0f} MB")
        print(f"baseline json.loads only: {baseline:,.0f} lines/s")
        print(f"runner validate:          {rate:,.0f} lines/s ({rate / baseline:.2f} x baseline)")
        print(f"peak RSS: {peak_rss_mb():.0f} MB (before validating: {rss_before:.0f} MB)")


if __name__ == "__main__":
    main()
