"""Parquet export: rows per second and peak memory, for a run of --rows requests in the ledger.

    uv run python benchmarks/export.py [--rows 1000000]

A ledger is filled with finished requests (about 200 characters of content, a 700-byte response, tokens,
prices, timestamps). Each export runs in its own process so that its peak RSS is its own. Printed in
the same run: the baseline (a bare sqlite3 loop reading the same rows), `runner export` for a tenth of
the rows and for all of them (flat memory: the two peaks should be about the same), and the time
target (1,000,000 rows in 15 s at most).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runner.ledger import Ledger

CONTENT = "The answer, in a sentence or two of plain text, as a model would give it back. " * 3
RESPONSE = '{"id":"chatcmpl-x","object":"chat.completion","choices":[{"index":0,"message":{}}]}' + " " * 600


def fill(db: Path, run_id: str, rows: int) -> None:
    ledger = Ledger(f"sqlite:///{db}")
    budget = ledger.create_budget(f"b-{run_id}", 10**15)
    ledger.create_run(run_id, f"/jobs/{run_id}.jsonl", budget.id, "simulator:tokens")
    ledger.close()
    conn = sqlite3.connect(db)
    columns = (
        "run_id, custom_id, line, model, sha256, state, quote_nanos, quote_exact, reserved_nanos,"
        " price_nanos, attempts, prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens, content,"
        " finish_reason, response_json, latency_s, started_at, finished_at, metadata_json"
    )
    sql = f"INSERT INTO requests ({columns}) VALUES ({', '.join('?' * 22)})"
    at = "2026-11-22 01:00:00.000000"
    batch = []
    for i in range(rows):
        batch.append(
            (run_id, f"req-{i}", i + 1, "openai/gpt-oss-120b", f"{i:064x}", "ok", 30_000, 1, 0,
             12_345 + i % 1000, 1, 40, 120, 0, 0, CONTENT, "stop", RESPONSE, 0.25, at, at, f'{{"i": {i}}}')
        )  # fmt: skip
        if len(batch) == 50_000:
            conn.executemany(sql, batch)
            batch.clear()
    conn.executemany(sql, batch)
    conn.commit()
    conn.close()


def bare_read(db: Path, run_id: str) -> float:
    conn = sqlite3.connect(db)
    start = time.perf_counter()
    n = sum(1 for _ in conn.execute("SELECT * FROM requests WHERE run_id = ? ORDER BY line", (run_id,)))
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def export(db: Path, run_id: str, out: Path) -> tuple[float, int]:
    """`runner export` in its own process: (seconds, peak RSS in MB)."""
    env = {**os.environ, "RUNNER_DB": f"sqlite:///{db}"}
    command = [sys.executable, "-m", "runner", "export", run_id, "-o", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        msg = "runner export failed"
        raise RuntimeError(msg)
    return elapsed, usage.ru_maxrss // 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "ledger.db"
        small, big = max(1, args.rows // 10), args.rows
        print(f"filling a ledger with {small:,} + {big:,} rows ...", flush=True)
        fill(db, "small", small)
        fill(db, "big", big)
        base = bare_read(db, "big")
        print(f"bare sqlite3 read (baseline)   {base:10,.0f} rows/s")
        for name, n in (("small", small), ("big", big)):
            out = Path(folder) / f"{name}.parquet"
            seconds, rss = export(db, name, out)
            rate = n / seconds
            size = out.stat().st_size / 1e6
            print(
                f"runner export, {n:>9,} rows  {rate:10,.0f} rows/s  {rate / base:.2f} x  {seconds:6.1f} s"
                f"  peak RSS {rss:,} MB  ({size:,.0f} MB of Parquet)"
            )
        print(f"target: {args.rows:,} rows in <= 15 s, peak RSS about the same for both sizes")


if __name__ == "__main__":
    main()
