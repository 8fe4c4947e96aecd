"""Price files and the upper-bound quote of an OpenAI-compatible endpoint: any model the price file
prices, a quote no charge can exceed, and what happens when a price file is wrong anyway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from runner.app.export import export_parquet
from runner.app.run import run_job
from runner.cli.main import app
from runner.core import catalog, schema
from runner.core.config import ProviderSettings, RunConfig
from runner.core.errors import ConfigError
from runner.ledger import Ledger
from runner.providers.base import table_quote
from runner.providers.openai import OpenAIProvider
from runner.providers.prices import load_prices, price_table
from runner.providers.registry import Connection

Serve = Callable[[web.Application], Awaitable[str]]


def test_a_price_file_prices_a_model_outside_the_catalog(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(
        '[models.smollm2]\ninput = 0.10\noutput = "0.50"\ncontext_window = 2048\n'
        'per_message_tokens = 4\nper_request_tokens = 32\n\n[models."my/model"]\ninput = 1\noutput = 2\n'
    )
    table = price_table(ProviderSettings("openai", price_file=prices))
    small = table["smollm2"]
    assert (small.input_price, small.output_price) == (Decimal("0.0000001"), Decimal("0.0000005"))
    assert (small.context_window, small.per_message_tokens, small.per_request_tokens) == (2048, 4, 32)
    mine = table["my/model"]
    assert mine.context_window is None and mine.per_request_tokens == catalog.PER_REQUEST_TOKENS
    assert "openai/gpt-oss-120b" in table  # the catalog stays
    # the Run API's models are the catalog's whatever the price file says
    assert "smollm2" not in price_table(ProviderSettings("orthogonal", price_file=prices))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.m]\ninput = 1\n", "m: give 'input' and 'output'"),
        ("[models.m]\ninput = 1\noutput = -2\n", "m: output: -2 is not an amount"),
        ("[models.m]\ninput = 1\noutput = 2\ncontext = 9\n", "m: unknown key 'context'"),
        ("[models.m]\ninput = 1\noutput = 2\ncontext_window = 1.5\n", "context_window: must be a whole"),
        ('[models."a\\u001b[31m"]\ninput = 1\noutput = true\n', "a\\x1b[31m: output"),
        ("[models.m\n", "cannot read the price file"),
        ("[models.m]\ninput = 1e300\noutput = 2\n", "m: input: 1e+300 USD per 1M tokens is out of range"),
        ("[models.m]\ninput = 1\noutput = 1e-30\n", "m: output: 1e-30 USD per 1M tokens is out of range"),
        ("[models.m]\ninput = inf\noutput = 2\n", "m: input: inf is not an amount"),
        ("[models.m]\ninput = nan\noutput = 2\n", "m: input: nan is not an amount"),
        ('{"models": {"m": {"input": "1e999999999", "output": 1}}}', "m: input: 1e999999999 USD per 1M"),
    ],
)
def test_a_wrong_price_file_is_named_with_the_model_and_key(tmp_path: Path, text: str, message: str) -> None:
    prices = tmp_path / ("prices.json" if text.startswith("{") else "prices.toml")
    prices.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_prices(prices)
    assert message in str(caught.value) and str(prices) in str(caught.value)
    assert "\x1b" not in str(caught.value)


def test_a_job_of_a_priced_model_validates_and_an_unpriced_one_is_named(
    tmp_path: Path, write_job: Callable[..., Path]
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text("[models.smollm2]\ninput = 0.1\noutput = 0.5\n")
    job = write_job([{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}])
    args = ["estimate", str(job), "--provider", "openai", "--base-url", "http://127.0.0.1:9/v1"]
    result = CliRunner().invoke(app, [*args, "--price-file", str(prices)])
    assert result.exit_code == 0, result.output
    assert "upper bound" in result.output
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "unknown model 'smollm2'" in result.output


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=200)}
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200)
@given(messages=messages, max_tokens=st.integers(1, 5000), n=st.integers(1, 4))
def test_the_bound_covers_every_byte_and_every_answer_token(
    messages: list[dict[str, str]], max_tokens: int, n: int
) -> None:
    """A byte-level tokenizer makes at most one token per UTF-8 byte of the text; the answer has at
    most max_tokens per choice."""
    info = catalog.ModelInfo("m", None, False, False, Decimal(1), Decimal(1000))
    body: dict[str, Any] = {"model": "m", "messages": messages, "max_tokens": max_tokens, "n": n}
    text_bytes = sum(len(m["content"].encode()) + len(m["role"].encode()) for m in messages)
    assert schema.prompt_token_bound(body, info) >= text_bytes + info.per_request_tokens
    assert schema.output_token_bound(body, info) == max_tokens * n
    quote = table_quote(body, info)
    assert quote.amount == schema.prompt_token_bound(body, info) + max_tokens * n * 1000
    assert not quote.exact


def test_without_max_tokens_the_answer_is_bounded_by_the_context_window() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    known = catalog.ModelInfo("m", 2048, False, False, Decimal(1), Decimal(1))
    unknown = catalog.ModelInfo("m", None, False, False, Decimal(1), Decimal(1))
    assert schema.output_token_bound(body, known) == 2048
    assert schema.output_token_bound(body, unknown) == catalog.DEFAULT_MAX_TOKENS


async def test_charges_above_their_quotes_count_and_the_run_stops_before_the_limit(
    serve_app: Serve, write_job: Callable[..., Path]
) -> None:
    """A server whose usage is far above anything the price file's bound allows (a wrong price file,
    as it looks to the runner): the excess is charged to the budget, launching stops with the reason,
    and what is left never reads below zero."""

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 100_000, "completion_tokens": 1, "total_tokens": 100_001},
            }
        )

    server = web.Application()
    server.router.add_post("/v1/chat/completions", completions)
    prices = {"m": catalog.ModelInfo("m", None, False, False, Decimal("0.000001"), Decimal("0.000001"))}
    provider = OpenAIProvider(base_url=await serve_app(server) + "/v1", prices=prices)
    line = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    job = write_job([{**line, "custom_id": f"r{i}"} for i in range(40)])
    ledger = Ledger()
    notices: list[str] = []
    try:
        result = await run_job(
            # 40 identical lines, each sent
            RunConfig(job=job, max_usd=Decimal("0.5"), concurrency=1, partial=True, cache="off"),
            conn=Connection(provider, "openai:test"),
            ledger=ledger,
            models=prices,
            on_event=lambda event: notices.append(str(getattr(event, "message", ""))),
        )
    finally:
        await provider.aclose()
    assert result.state == "stopped"
    assert (
        result.reason is not None
        and "5 request(s) of the run were charged above their holds" in result.reason
    )
    assert any("above its hold" in n for n in notices)
    view = ledger.budget_by_id(ledger.run(result.run_id).budget_id)
    assert result.states["ok"] == 5  # $0.10 each: the sixth reservation no longer fits
    assert view.spent_nanos == 5 * 100_001_000 and view.remaining_nanos == 0 and view.overspent_nanos > 0


def test_a_huge_price_is_refused_before_any_quote_not_a_traceback(
    write_job: Callable[..., Path], tmp_path: Path
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."openai/gpt-oss-120b"]\ninput = 1e300\noutput = 1\n')
    job = write_job([{"model": "openai/gpt-oss-120b", "messages": [{"role": "user", "content": "hi"}]}])
    for command in (["estimate", str(job)], ["run", str(job), "--max-usd", "1"]):
        endpoint = ["--provider", "openai", "--base-url", "http://127.0.0.1:9/v1"]
        args = [*command, *endpoint, "--price-file", str(prices)]
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 2, done.output
        assert "input: 1e+300 USD per 1M tokens is out of range" in done.output
        assert "Traceback" not in done.output and "InvalidOperation" not in done.output


def test_an_edited_price_file_prices_the_next_estimate_and_run(tmp_path: Path) -> None:
    """Quotes from a price table are not kept in the ledger's quote cache: a cached quote would
    outlive a corrected price file, and the budget would be held at the old prices."""
    job = tmp_path / "job.jsonl"
    line = '{"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}\n'
    job.write_text(line)
    prices = tmp_path / "prices.toml"
    cli = CliRunner()
    args = ["estimate", str(job), "--provider", "openai", "--base-url", "http://127.0.0.1:9/v1"]
    totals = []
    for price in ("1", "10"):
        prices.write_text(f"[models.m]\ninput = {price}\noutput = {price}\n")
        done = cli.invoke(app, [*args, "--price-file", str(prices), "--json"], env={"OPENAI_API_KEY": "k"})
        assert done.exit_code == 0, done.output
        totals.append(Decimal(json.loads(done.output)["total_usd"]))
    assert totals[1] == 10 * totals[0] > 0
    with Ledger().reading() as c:
        assert c.execute("SELECT count(*) FROM quotes").fetchone()[0] == 0


def test_batch_prices_are_given_or_a_discount_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        "[m1]\ninput = 1.0\noutput = 3.0\nbatch_discount = 0.5\n"
        "[m2]\ninput = 1.0\noutput = 3.0\nbatch_input = 0.4\nbatch_output = 1.2\n"
        "[m3]\ninput = 1.0\noutput = 3.0\n"
    )
    table = catalog.with_prices({}, load_prices(path))
    per_token = Decimal(1) / catalog.PER_MILLION
    one = table["m1"].at_batch_prices()
    assert one is not None and (one.input_price, one.output_price) == (
        Decimal("0.5") * per_token,
        Decimal("1.5") * per_token,
    )
    two = table["m2"].at_batch_prices()
    assert two is not None and (two.input_price, two.output_price) == (
        Decimal("0.4") * per_token,
        Decimal("1.2") * per_token,
    )
    assert table["m3"].at_batch_prices() is None  # no batch price: a batch run refuses the model
    for bad, message in [
        ("batch_discount = 1.5", "from 0 to below 1"),
        ("batch_input = 0.4", "give both batch_input and batch_output"),
        ("batch_discount = 0.5\nbatch_input = 0.4\nbatch_output = 1", "not both"),
        ("batch_input = 'cheap'\nbatch_output = 1", "batch_input: cheap is not an amount"),
    ]:
        path.write_text(f"[m]\ninput = 1.0\noutput = 3.0\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_prices(path)


async def test_a_server_past_max_tokens_overruns_by_the_requests_in_flight_at_most_and_is_counted_exactly(
    serve_app: Serve, write_job: Callable[..., Path], tmp_path: Path
) -> None:
    """A server that reports 10 x max_tokens (a mock proxy does): each charge above its hold counts
    against the budget before the next reservation, so the overrun is bounded by the requests in
    flight, and the reason counts the over-charged requests as the Parquet has them."""

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(0.02)
        usage = {"prompt_tokens": 10, "completion_tokens": 10 * body["max_tokens"], "total_tokens": 0}
        message = {"role": "assistant", "content": "ok"}
        choice = {"index": 0, "message": message, "finish_reason": "length"}
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [choice],
                "usage": usage,
            }
        )

    server = web.Application()
    server.router.add_post("/v1/chat/completions", completions)
    per_token = Decimal("0.000001")
    prices = {"m": catalog.ModelInfo("m", 1000, False, False, per_token, per_token)}
    provider = OpenAIProvider(base_url=await serve_app(server) + "/v1", prices=prices)
    line = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    job = write_job([{**line, "custom_id": f"r{i}"} for i in range(200)])
    ledger = Ledger()
    concurrency = 8
    try:
        result = await run_job(
            RunConfig(job=job, max_usd=Decimal("0.01"), concurrency=concurrency, partial=True, cache="off"),
            conn=Connection(provider, "openai:test"),
            ledger=ledger,
            models=prices,
        )
    finally:
        await provider.aclose()
    out = tmp_path / "over.parquet"
    export_parquet(ledger, result.run_id, out)
    frame = pl.read_parquet(out)
    over = frame.filter(pl.col("price_usd") > pl.col("quote_usd")).height
    assert result.state == "stopped" and over > 0
    assert f"({over} request(s) of the run were charged above their holds" in (result.reason or "")
    view = ledger.budget_by_id(ledger.run(result.run_id).budget_id)
    excess = 10 * 100 * int(per_token * 10**9)  # the most one request is charged beyond its hold
    assert view.spent_nanos - view.limit_nanos <= concurrency * excess
