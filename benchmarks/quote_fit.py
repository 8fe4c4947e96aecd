"""How close the quotes come to the charge on llama.cpp's server (SmolLM2, the tests' price file): a
200-request mixed job (plain, streamed, stop, json_object, tools, max_tokens 1-12), quoted with the
prompt bounded by its bytes and with the prompt counted by the server (`tokenized`), in the same run.

    uv run python -m benchmarks.quote_fit

Printed per way: quoted and charged USD, quote ÷ charge (median and p90; the json_object rows apart),
and how many rows were charged above their quote (target: none).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import httpx
import polars as pl

from runner.app.export import export_parquet
from runner.app.run import run_job
from runner.core import catalog
from runner.core.config import RunConfig
from runner.ledger import Ledger
from runner.providers.connection import Connection
from runner.providers.openai import OpenAIProvider
from runner.providers.prices import load_prices
from tests.test_llama import PRICES, SERVER, mixed_job

PORT = 8811


def job_lines() -> list[dict[str, object]]:
    """The tests' 30-line mixed job, seven times over with the prompts varied: 200 lines."""
    lines = []
    for take in range(7):
        for line in mixed_job():
            messages = [{**m, "content": f"{m['content']} (take {take})"} for m in line["messages"]]
            lines.append({**line, "custom_id": f"{line['custom_id']}-{take}", "messages": messages})
    return lines[:200]


async def measure(folder: Path, base: str) -> None:
    (folder / "prices.toml").write_text(PRICES)
    prices = catalog.with_prices(catalog.MODELS, load_prices(folder / "prices.toml"))
    lines = job_lines()
    job = folder / "job.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in lines))
    json_rows = {str(line["custom_id"]) for line in lines if "response_format" in line}
    for counted in (False, True):
        ledger = Ledger(f"sqlite:///{folder}/ledger-{counted}.db")
        provider = OpenAIProvider(base_url=base, prices=prices, count_prompts=counted)
        try:
            config = RunConfig(job=job, max_usd=Decimal(1000), concurrency=4, cache="off")
            result = await run_job(
                config, conn=Connection(provider, "openai:bench"), ledger=ledger, models=prices
            )
        finally:
            await provider.aclose()
        export_parquet(ledger, result.run_id, folder / f"out-{counted}.parquet")
        frame = pl.read_parquet(folder / f"out-{counted}.parquet").filter(pl.col("status") == "ok")
        rows = list(frame.select("custom_id", "quote_usd", "price_usd").iter_rows())
        ratios = sorted(float(q / p) for _, q, p in rows)
        json_ratios = sorted(float(q / p) for c, q, p in rows if c in json_rows)

        def spread(values: list[float]) -> str:
            return f"median {statistics.median(values):.2f}, p90 {values[int(len(values) * 0.9)]:.2f}"

        way = "prompt counted by the server" if counted else "prompt bounded by its bytes"
        print(
            f"{way}: {len(rows)} rows, quoted ${frame['quote_usd'].sum()}, "
            f"charged ${frame['price_usd'].sum()}; "
            f"quote/charge {spread(ratios)} (json_object {spread(json_ratios)}); "
            f"{sum(r < 1 for r in ratios)} charged above their quote",
            flush=True,
        )


def main() -> None:
    server = subprocess.Popen(
        [sys.executable, str(SERVER), str(PORT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("llama.cpp's server did not start")
            time.sleep(0.2)
        with tempfile.TemporaryDirectory() as folder:
            asyncio.run(measure(Path(folder), f"http://127.0.0.1:{PORT}/v1"))
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
