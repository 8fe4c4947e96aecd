"""The simulator's Batch API, driven by the `openai` SDK's own client: the shapes are the real ones."""

from __future__ import annotations

import io
import json
import time
from decimal import Decimal

import httpx
import openai
import pytest

from runner.core import catalog
from runner.simulator import SimulatorThread
from runner.simulator.fakes import generate

MODEL = "openai/gpt-oss-120b"


def _file(n: int, *, tag: str = "") -> io.BytesIO:
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "max_tokens": 40,
                "messages": [{"role": "user", "content": f"q{tag}{i}"}],
            },
        }
        for i in range(n)
    ]
    data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    data.name = "batch.jsonl"
    return data


def _client(sim: SimulatorThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sim.base_url}/v1", api_key="sk-test", max_retries=0)


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 20.0) -> openai.types.Batch:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not end")


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_batch_lifecycle_with_the_sdk_charges_each_line_once_at_half_price(sim: SimulatorThread) -> None:
    sim.books.configure({"batch_duration": 0.5})
    client = _client(sim)
    uploaded = client.files.create(file=_file(5), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"runner_run": "r1", "runner_part": "1"},
    )
    assert batch.status == "validating" and batch.metadata == {"runner_run": "r1", "runner_part": "1"}
    ended = _wait(client, batch.id)
    assert ended.status == "completed"
    assert ended.request_counts is not None and ended.request_counts.completed == 5
    out = _lines(client, ended.output_file_id)
    assert sorted(x["custom_id"] for x in out) == [f"c{i}" for i in range(5)]
    info = catalog.MODELS[MODEL]
    assert info.input_price is not None and info.output_price is not None
    books = sim.books.transactions
    assert len(books) == 5 and {t["batchId"] for t in books} == {batch.id}
    for line in out:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200
        usage = body["usage"]
        sync = usage["prompt_tokens"] * info.input_price + usage["completion_tokens"] * info.output_price
        charge = next(t for t in books if t["customId"] == line["custom_id"])
        assert Decimal(charge["amount"]) == (sync / 2).quantize(Decimal("1e-9"))
        expected = generate(
            {
                "model": MODEL,
                "max_tokens": 40,
                "messages": [{"role": "user", "content": "q" + line["custom_id"][1:]}],
            },
            info,
        )
        assert body["choices"][0]["message"]["content"] == expected.content
    # a second look charges nothing more
    client.batches.retrieve(batch.id)
    assert len(sim.books.transactions) == 5
    assert httpx.get(f"{sim.base_url}/_sim/stats").json()["batches_created"] == 1
    listed = client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]


def test_an_expiring_batch_delivers_what_completed_and_the_next_one_completes(sim: SimulatorThread) -> None:
    sim.books.configure({"batch_duration": 0.3, "batch_expire_fraction": 0.5})
    client = _client(sim)
    first = client.batches.create(
        input_file_id=client.files.create(file=_file(10), purpose="batch").id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    second = client.batches.create(
        input_file_id=client.files.create(file=_file(4, tag="b"), purpose="batch").id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    expired = _wait(client, first.id)
    assert expired.status == "expired"
    assert len(_lines(client, expired.output_file_id)) == 5
    errors = _lines(client, expired.error_file_id)
    assert len(errors) == 5 and {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert _wait(client, second.id).status == "completed"
    assert len(sim.books.transactions) == 5 + 4


def test_cancel_list_errors_and_the_size_limit(sim: SimulatorThread) -> None:
    sim.books.configure({"batch_duration": 30, "batch_max_requests": 3, "batch_line_error_rate": 1.0})
    client = _client(sim)
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(
            input_file_id=client.files.create(file=_file(4), purpose="batch").id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert refused.value.code == "batch_too_large"
    batch = client.batches.create(
        input_file_id=client.files.create(file=_file(3), purpose="batch").id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert client.batches.cancel(batch.id).status == "cancelling"
    ended = _wait(client, batch.id)
    assert ended.status == "cancelled" and ended.output_file_id is None
    assert {e["error"]["code"] for e in _lines(client, ended.error_file_id)} == {"batch_cancelled"}
    assert sim.books.transactions == []
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    # line errors: answered with an error body, never charged
    sim.books.configure({"batch_duration": 0})
    failing = client.batches.create(
        input_file_id=client.files.create(file=_file(2, tag="e"), purpose="batch").id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    ended = _wait(client, failing.id)
    assert ended.request_counts is not None and ended.request_counts.failed == 2
    assert {e["response"]["status_code"] for e in _lines(client, ended.error_file_id)} == {500}
    assert sim.books.transactions == []
    pages = client.batches.list(limit=1)
    assert len(pages.data) == 1 and pages.has_more
    assert {b.id for b in client.batches.list(limit=1)} == {batch.id, failing.id}  # every page
