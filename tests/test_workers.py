"""The workers of a run in the ledger: joining, claims, shares of the concurrency, takeover of a
lapsed worker, and the run-wide token buckets, on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools

import anyio

from runner.core.models import ChatRequest
from runner.ledger import Hold, Ledger, Settlement
from runner.providers.limits import Limits

QUOTE = 1_000_000
names = itertools.count()


def _run(ledger: Ledger, lines: int = 6) -> str:
    budget = ledger.create_budget(f"b{next(names)}", 100 * QUOTE)
    run_id = f"r{next(names)}"
    ledger.create_run(run_id, "job.jsonl", budget.id, "sim")
    rows = [
        {
            "run_id": run_id,
            "custom_id": f"q{n}",
            "line": n,
            "model": "m",
            "sha256": "h",
            "state": "pending",
            "quote_nanos": QUOTE,
            "quote_exact": True,
            "reserved_nanos": 0,
            "attempts": 0,
        }
        for n in range(1, lines + 1)
    ]
    ledger.add_requests(rows)
    return run_id


def _rows(ledger: Ledger, run_id: str) -> dict[int, tuple[str, str | None]]:
    with ledger.reading() as c:
        found = c.execute("SELECT line, state, worker_id FROM requests WHERE run_id = ?", (run_id,))
        return {int(line): (str(state), worker) for line, state, worker in found}


def _seen_long_ago(ledger: Ledger, worker: str) -> None:
    with ledger.transaction() as tx:
        tx.conn.execute("UPDATE workers SET seen_at = ? WHERE id = ?", ("2020-01-01 00:00:00.000000", worker))


def test_workers_claim_chunks_in_turn_and_each_request_once(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    run_id = _run(ledger, lines=5)
    assert ledger.join_run(run_id, "elsewhere:1:a", 4).alone
    assert not ledger.join_run(run_id, "elsewhere:2:b", 4).alone
    with ledger.transaction() as tx:
        assert ledger.claim_chunk(tx, run_id, "elsewhere:1:a", 2) == 0
        assert ledger.claim_chunk(tx, run_id, "elsewhere:2:b", 2) == 1
        assert ledger.claim_chunk(tx, run_id, "elsewhere:1:a", 2) == 2
        assert ledger.claim_chunk(tx, run_id, "elsewhere:2:b", 2) == 3  # past the end: nothing claimed
    owners = {line: worker for line, (_, worker) in _rows(ledger, run_id).items()}
    assert owners == {
        1: "elsewhere:1:a",
        2: "elsewhere:1:a",
        3: "elsewhere:2:b",
        4: "elsewhere:2:b",
        5: "elsewhere:1:a",
    }
    with ledger.transaction() as tx:
        assert ledger.claim_orphans(tx, run_id, "elsewhere:2:b", 10) == []  # all held by a running worker
        assert ledger.others_unfinished(tx, run_id, "elsewhere:2:b") == 3
    assert not ledger.leave_run(run_id, "elsewhere:1:a", (0, 0, 0))  # b still runs, requests unsent
    with ledger.transaction() as tx:  # a left: its unsent claims are anyone's
        assert ledger.claim_orphans(tx, run_id, "elsewhere:2:b", 10) == [1, 2, 5]
        assert ledger.others_unfinished(tx, run_id, "elsewhere:2:b") == 0
    assert ledger.leave_run(run_id, "elsewhere:2:b", (0, 0, 0))  # the last one


def test_a_lapsed_worker_is_taken_over_in_flight_possibly_billed_and_unsent_back_to_the_pool(
    ledger_url: str,
) -> None:
    ledger = Ledger(ledger_url)
    run_id = _run(ledger, lines=3)
    budget_id = ledger.run(run_id).budget_id
    ledger.join_run(run_id, "elsewhere:1:a", 4)
    with ledger.transaction() as tx:
        ledger.claim_chunk(tx, run_id, "elsewhere:1:a", 10)
    ids = {line: row.id for line, row in _ids(ledger, run_id).items()}
    with ledger.transaction() as tx:
        for line in (1, 2):
            assert ledger.reserve(tx, budget_id, run_id, ids[line], QUOTE)
        ledger.mark_sending(tx, ids[1], 1)  # in flight; 2 reserved, unsent; 3 claimed, pending
    _seen_long_ago(ledger, "elsewhere:1:a")
    joined = ledger.join_run(run_id, "elsewhere:2:b", 4)
    assert joined.alone and joined.taken_over == 1
    assert _rows(ledger, run_id) == {
        1: ("possibly_billed", "elsewhere:1:a"),
        2: ("pending", None),
        3: ("pending", None),
    }
    view = ledger.budget_by_id(budget_id)
    assert (view.reserved_nanos, view.possibly_billed_nanos) == (0, QUOTE)
    assert [w.state for w in ledger.workers(run_id)] == ["gone", "running"]

    # the lapsed worker's answer comes after all: settled from possibly billed, charged once
    with ledger.transaction() as tx:
        ledger.settle(tx, Settlement(ids[1], QUOTE // 2, {}, Hold(QUOTE, budget_id, run_id)))
    view = ledger.budget_by_id(budget_id)
    assert (view.spent_nanos, view.reserved_nanos, view.possibly_billed_nanos) == (QUOTE // 2, 0, 0)
    with ledger.transaction() as tx:  # and it learns at its next sign of life that it was taken for gone
        assert not ledger.heartbeat(tx, run_id, "elsewhere:1:a", (1, 0, 0), 4, 0).alive


def _ids(ledger: Ledger, run_id: str) -> dict[int, object]:
    rows = ledger.request_rows(run_id, [f"q{n}" for n in range(1, 10)])
    with ledger.reading() as c:
        lines = dict(c.execute("SELECT custom_id, line FROM requests WHERE run_id = ?", (run_id,)).fetchall())
    return {int(lines[custom_id]): row for custom_id, row in rows.items()}


def test_a_live_worker_on_another_host_is_not_taken_over(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    run_id = _run(ledger)
    ledger.join_run(run_id, "elsewhere:1:a", 4)
    joined = ledger.join_run(run_id, "elsewhere:2:b", 4)
    assert not joined.alone and joined.taken_over == 0


def test_the_run_concurrency_is_shared_and_never_exceeded_as_workers_join(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    run_id = _run(ledger)
    assert ledger.join_run(run_id, "h:1:a", 10).slots == 10
    assert ledger.join_run(run_id, "h:2:b", 10).slots == 0  # a holds all ten

    def beat(worker: str, in_flight: int) -> int:
        with ledger.transaction() as tx:
            return ledger.heartbeat(tx, run_id, worker, (0, 0, 0), 10, in_flight).slots

    def recorded() -> int:
        return sum(w.slots for w in ledger.workers(run_id) if w.state == "running")

    assert beat("h:1:a", in_flight=10) == 5  # its share now; its ten in flight still count
    assert recorded() == 10
    assert beat("h:2:b", in_flight=0) == 0
    assert beat("h:1:a", in_flight=3) == 5
    assert beat("h:2:b", in_flight=0) == 5
    assert recorded() == 10
    ledger.leave_run(run_id, "h:1:a", (0, 0, 0))
    assert beat("h:2:b", in_flight=5) == 10


def test_a_run_wide_bucket_grants_what_the_ledger_clock_has_earned(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    run_id = _run(ledger)
    with ledger.transaction() as tx:  # starts empty: nothing before it has earned any
        granted, wait = ledger.take_units(tx, run_id, "rpm", 10.0, 10, 5, start_empty=True)
    assert granted == 0 and 0 < wait <= 0.1

    def earned_since(seconds: float) -> None:
        with ledger.transaction() as tx:
            tx.conn.execute("UPDATE run_limits SET stamp = stamp - ? WHERE run_id = ?", (seconds, run_id))

    earned_since(0.5)
    with ledger.transaction() as tx:
        granted, _ = ledger.take_units(tx, run_id, "rpm", 10.0, 10, 8, start_empty=True)
    assert granted == 5
    earned_since(100)  # a long idle spell earns no more than the bucket holds
    with ledger.transaction() as tx:
        granted, _ = ledger.take_units(tx, run_id, "rpm", 10.0, 10, 50, start_empty=True)
    assert granted == 10


async def test_two_workers_limits_share_one_rpm_bucket_in_the_ledger(ledger_url: str) -> None:
    """Two processes' `Limits`, shared through the ledger: together they get the run's rate, not
    twice it."""
    ledger = Ledger(ledger_url)
    run_id = _run(ledger)

    async def fetch(name: str, per_second: float, capacity: int, want: int, empty: bool) -> tuple[int, float]:
        def work() -> tuple[int, float]:
            with ledger.transaction() as tx:
                return ledger.take_units(tx, run_id, name, per_second, capacity, want, start_empty=empty)

        return await anyio.to_thread.run_sync(work)

    workers_limits = [Limits(4, rpm=1200) for _ in range(2)]  # 20 a second (at 99.5 %) for the run
    for limits in workers_limits:
        limits.share(fetch)
    request = ChatRequest("job.jsonl", 1, "a", {"model": "m", "messages": []}, {}, "0" * 64)
    taken = [0, 0]

    async def pace(i: int) -> None:
        while True:
            await workers_limits[i].pace(request)
            taken[i] += 1

    with anyio.move_on_after(1.5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pace, 0)
            tg.start_soon(pace, 1)
    assert all(taken), taken  # both were paced, from the one bucket
    assert sum(taken) <= 1.5 * 20 * 0.995 + 2, taken  # the run's rate, not each worker's
    assert sum(taken) >= 15, taken


def test_a_worker_that_leaves_a_run_with_nothing_unsent_finishes_it_whoever_else_is_listed(
    ledger_url: str,
) -> None:
    ledger = Ledger(ledger_url)
    run_id = _run(ledger, lines=2)
    ledger.join_run(run_id, "elsewhere:1:a", 4)
    ledger.join_run(run_id, "elsewhere:2:b", 4)  # seen just now: alive, for all a can tell
    with ledger.transaction() as tx:
        tx.conn.execute("UPDATE requests SET state = 'failed' WHERE run_id = ?", (run_id,))
    assert ledger.leave_run(run_id, "elsewhere:1:a", (0, 0, 0))
