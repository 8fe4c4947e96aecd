"""What it takes to extend runner, shown working: a provider is a module with a `connect` opener plus one
registry line; a result column is its line in runner.core.result, its migration and its filler."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from runner.cli.main import app
from runner.core import result
from runner.core.config import ProviderSettings
from runner.core.models import ChatRequest, Outcome, Quote, Usage
from runner.ledger import Ledger
from runner.providers import registry
from runner.providers.connection import Connection, opened

MODEL = "openai/gpt-oss-120b"


def _lines(n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"c{i}",
            "model": MODEL,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": f"q{i}"}],
        }
        for i in range(n)
    ]


class ToyProvider:
    """Answers every request with its own custom_id, at a flat $0.001, quoted exactly."""

    name = "toy"
    dry_runs = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def quote(self, request: ChatRequest) -> Quote:
        return Quote(Decimal("0.001"), exact=True, source="toy")

    async def complete(self, request: ChatRequest, headers: dict[str, str] | None = None) -> Outcome:
        self.calls.append(request.custom_id)
        completion = {
            "id": f"toy-{request.custom_id}",
            "choices": [{"message": {"role": "assistant", "content": f"toy {request.custom_id}"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
        usage = Usage(prompt_tokens=3, completion_tokens=2)
        return Outcome(completion, usage, Decimal("0.001"), latency_s=0.01)

    async def models(self) -> list[str]:
        return [MODEL]

    async def aclose(self) -> None:
        return None


def test_a_provider_registered_from_outside_runs_a_job(
    write_job: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toy = ToyProvider()

    @asynccontextmanager
    async def connect(settings: ProviderSettings) -> AsyncIterator[Connection]:
        async with opened(toy, "toy:") as conn:
            yield conn

    monkeypatch.setitem(registry.PROVIDERS, "toy", connect)  # the one registry line
    job = write_job(_lines(5))
    out = tmp_path / "toy.parquet"
    done = CliRunner().invoke(app, ["run", str(job), "--provider", "toy", "--max-usd", "1", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert sorted(toy.calls) == [f"c{i}" for i in range(5)]
    frame = pl.read_parquet(out)
    assert frame["content"].to_list() == [f"toy c{i}" for i in range(5)]
    assert frame["price_usd"].sum() == Decimal("0.005")
    assert Ledger().runs()[0].spent_nanos == 5_000_000


def test_a_result_column_declared_migrated_and_filled_reaches_the_parquet_and_the_cache(
    write_job: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1. its definition, with its filler: the provider's completion id
    column = result.ResultField("completion_id", str, lambda outcome, _: outcome.completion.get("id"))
    monkeypatch.setattr(result, "RESULT_FIELDS", (*result.RESULT_FIELDS, column))
    # 2. its migration (what a migration file would do)
    with Ledger().transaction() as tx:
        tx.conn.execute("ALTER TABLE requests ADD COLUMN completion_id TEXT")
    job = write_job(_lines(4))
    first, again = tmp_path / "first.parquet", tmp_path / "again.parquet"
    cli = CliRunner()
    args = ["run", str(job), "--provider", "simulator", "--max-usd", "1"]
    assert cli.invoke(app, [*args, "-o", str(first)]).exit_code == 0
    # a fresh run of the same job: every answer comes from the ledger (cached, $0)
    done = cli.invoke(app, [*args, "--new", "-o", str(again)])
    assert done.exit_code == 0, done.output
    bought, reused = pl.read_parquet(first), pl.read_parquet(again)
    ids = bought["completion_id"].to_list()
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 4
    assert reused["cached"].all()
    assert reused["completion_id"].to_list() == ids
    assert reused.schema["completion_id"] == pl.String
