"""Ledger throughput: reservations + settlements per second through the grouped-commit Writer.

    uv run python benchmarks/ledger.py [--requests 20000] [--concurrency 256]

Baseline in the same run: the same reserve + settle pairs, one transaction each (no grouping).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio

from runner.ledger import Ledger, Settlement
from runner.ledger.writer import Writer


def setup(folder: str, n: int, name: str) -> tuple[Ledger, int, list[int]]:
    ledger = Ledger(f"sqlite:///{Path(folder) / f'{name}.db'}")
    budget = ledger.create_budget("bench", 10**15)
    ledger.create_run("run", "/bench.jsonl", budget.id, "bench")
    rows = [
        {
            "run_id": "run",
            "custom_id": str(i),
            "line": i + 1,
            "model": "m",
            "sha256": "x",
            "state": "pending",
            "quote_nanos": 5000,
            "reserved_nanos": 0,
            "attempts": 0,
            "quote_exact": True,
        }
        for i in range(n)
    ]
    for start in range(0, n, 5000):
        ledger.add_requests(rows[start : start + 5000])
    with ledger.reading() as c:
        ids = [r[0] for r in c.execute("SELECT id FROM requests ORDER BY id")]
    return ledger, budget.id, ids


async def grouped(ledger: Ledger, budget_id: int, ids: list[int], concurrency: int) -> float:
    writer = Writer(ledger)
    pending = iter(ids)

    async def worker() -> None:
        for row_id in pending:
            await writer.submit(lambda db, r=row_id: ledger.reserve(db, budget_id, "run", r, 5000))
            await writer.submit(lambda db, r=row_id: ledger.settle(db, Settlement(r, 4000, {"attempts": 1})))

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        async with anyio.create_task_group() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker)
        writer.close()
    return len(ids) / (time.perf_counter() - start)


def one_by_one(ledger: Ledger, budget_id: int, ids: list[int]) -> float:
    start = time.perf_counter()
    for row_id in ids:
        with ledger.transaction() as db:
            ledger.reserve(db, budget_id, "run", row_id, 5000)
        with ledger.transaction() as db:
            ledger.settle(db, Settlement(row_id, 4000, {"attempts": 1}))
    return len(ids) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ledger, budget_id, ids = setup(folder, args.requests // 4, "single")
        base = one_by_one(ledger, budget_id, ids)
        ledger, budget_id, ids = setup(folder, args.requests, "grouped")
        rate = anyio.run(grouped, ledger, budget_id, ids, args.concurrency)
        view = ledger.budget("bench")
        assert view.reserved_nanos == 0 and view.spent_nanos == 4000 * len(ids)
    print(f"one transaction per write (baseline): {base:8,.0f} reserve+settle/s")
    print(f"grouped commits (Writer):             {rate:8,.0f} reserve+settle/s  {rate / base:.1f} x")


if __name__ == "__main__":
    main()
