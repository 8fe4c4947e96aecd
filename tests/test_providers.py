"""Providers against mocked HTTP (pure parsing) and against the real loopback simulator."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from typer.testing import CliRunner

from runner.app.report import run_frame
from runner.app.run import run_job
from runner.cli.main import app
from runner.core import catalog
from runner.core.config import RunConfig, Timeouts
from runner.core.errors import OutcomeUnknown, RequestFatalError, RetryableError, RunFatalError
from runner.core.jobs import body_sha256, read_job
from runner.core.models import ChatRequest
from runner.ledger import Ledger
from runner.providers import http
from runner.providers.base import classify, error_from_response
from runner.providers.openai import OpenAIProvider
from runner.providers.orthogonal import OrthogonalProvider
from runner.providers.registry import Connection
from runner.simulator import Books, SimulatorThread

KEY = "sk-test-very-secret-key-123"


def reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> http.Reply:
    return http.Reply(status, CIMultiDict(headers or {}), json.dumps(payload).encode())


BODY: dict[str, Any] = {
    "model": "openai/gpt-oss-120b",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 40,
}


def chat(body: dict[str, Any] | None = None, custom_id: str = "r1") -> ChatRequest:
    body = body or BODY
    return ChatRequest("job.jsonl", 1, custom_id, body, {}, body_sha256(body))


# ---- classification and error shapes (no server) ----------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (408, None, RetryableError),
        (409, None, RetryableError),
        (429, None, RetryableError),
        (500, None, RetryableError),
        (502, None, RetryableError),
        (503, None, RetryableError),
        (400, None, RequestFatalError),
        (404, None, RequestFatalError),
        (413, None, RequestFatalError),
        (422, None, RequestFatalError),
        (401, None, RunFatalError),
        (402, None, RunFatalError),
        (None, "INSUFFICIENT_CREDITS", RunFatalError),
        (None, "UNAUTHORIZED", RunFatalError),
        (None, "RATE_LIMITED", RetryableError),
        (None, "NOT_FOUND", RequestFatalError),
        (200, "UPSTREAM_ERROR", RetryableError),
    ],
)
def test_classification(status: int | None, code: str | None, expected: type) -> None:
    assert type(classify(status, "x", code=code)) is expected


@pytest.mark.parametrize(
    ("status", "payload", "message"),
    [
        (402, {"success": False, "error": "no money", "code": "INSUFFICIENT_CREDITS"}, "no money"),
        (
            400,
            {"success": False, "error": "upstream", "data": {"error": "bad temperature"}},
            "bad temperature",
        ),
        (
            422,
            {"success": False, "data": {"error": {"type": "x", "message": "bad schema"}}},
            "bad schema",
        ),
        (
            400,
            {"error": {"message": "nested", "type": "invalid_request_error", "code": None}},
            "nested",
        ),
        (400, {"object": "error", "message": "flat vllm", "code": 400}, "flat vllm"),
        (500, {"error": "plain text"}, "plain text"),
    ],
)
def test_error_shapes(status: int, payload: dict[str, Any], message: str) -> None:
    error = error_from_response(reply(status, payload))
    assert message in str(error)
    assert error.status == status


def test_html_502_is_retryable_with_a_readable_message() -> None:
    response = http.Reply(502, CIMultiDict(), b"<html><body><h1>502 Bad Gateway</h1></body></html>")
    error = error_from_response(response)
    assert isinstance(error, RetryableError)
    assert "non-JSON reply: 502 Bad Gateway" in str(error)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "7"}, 7.0),
        ({}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert http.retry_after(CIMultiDict(headers)) == seconds


def test_x_should_retry_overrides_status() -> None:
    response = reply(400, {"error": "x"}, {"X-Should-Retry": "true"})
    assert isinstance(error_from_response(response), RetryableError)
    response = reply(503, {"error": "x"}, {"x-should-retry": "false"})
    assert isinstance(error_from_response(response), RequestFatalError)


def test_rate_limit_headers() -> None:
    limits = http.RateLimits.from_headers(
        CIMultiDict({"x-ratelimit-remaining-requests": "9", "x-ratelimit-reset-requests": "6m0s"})
    )
    assert limits.remaining_requests == 9
    assert limits.reset_requests_s == 360.0


async def test_run_api_envelope_is_built_as_the_contract_says(
    serve_app: Callable[[web.Application], Awaitable[str]],
) -> None:
    seen: list[dict[str, Any]] = []

    async def run(request: web.Request) -> web.Response:
        seen.append(await request.json())
        assert request.headers["authorization"] == f"Bearer {KEY}"
        return web.json_response({"success": True, "price": "0.000123456"})

    app = web.Application()
    app.router.add_post("/v1/run", run)
    provider = OrthogonalProvider(api_key=KEY, base_url=await serve_app(app))
    quote = await provider.quote(chat())
    assert quote.amount == Decimal("0.000123456")
    assert quote.exact
    assert seen == [{"api": "baseten", "path": "/v1/chat/completions", "body": BODY, "dryRun": True}]
    await provider.aclose()


async def test_refused_dry_run_falls_back_to_a_marked_estimate(
    serve_app: Callable[[web.Application], Awaitable[str]],
) -> None:
    async def run(request: web.Request) -> web.Response:
        return web.json_response({"success": False, "error": "dryRun not supported"}, status=400)

    app = web.Application()
    app.router.add_post("/v1/run", run)
    provider = OrthogonalProvider(api_key=KEY, base_url=await serve_app(app))
    quote = await provider.quote(chat())
    assert quote.source == "estimate"
    assert not quote.exact
    assert quote.amount is not None and quote.amount > 0
    await provider.aclose()


async def test_openai_quote_is_a_price_table_bound_and_unknown_when_unpriced() -> None:
    provider = OpenAIProvider(base_url="http://unit.test/v1")
    quote = await provider.quote(chat())
    info = catalog.MODELS["openai/gpt-oss-120b"]
    assert quote.amount is not None and quote.amount >= 40 * info.output_price
    assert not quote.exact
    unpriced = await provider.quote(chat({**BODY, "model": "moonshotai/Kimi-K2-Thinking"}))
    assert unpriced.amount is None
    assert "no published price" in unpriced.reason
    await provider.aclose()


# ---- against the real loopback simulator ----------------------------------------------------


def providers(sim: SimulatorThread) -> list[Any]:
    return [
        OrthogonalProvider(api_key=KEY, base_url=sim.base_url, timeouts=Timeouts(2.0, 2.0)),
        OpenAIProvider(api_key=KEY, base_url=sim.base_url + "/v1", timeouts=Timeouts(2.0, 2.0)),
    ]


FAULTS = [
    ("429", RetryableError, 429),
    ("500", RetryableError, 500),
    ("502", RetryableError, 502),
    ("503", RetryableError, 503),
    ("502html", RetryableError, 502),
    ("reset", OutcomeUnknown, None),
    ("stall", OutcomeUnknown, None),
]


@pytest.mark.parametrize(("fault", "error", "status"), FAULTS, ids=[f[0] for f in FAULTS])
async def test_faults_for_both_providers(
    sim: SimulatorThread, fault: str, error: type, status: int | None
) -> None:
    for provider in providers(sim):
        sim.books.configure({"script": [{"fault": fault}]})
        with pytest.raises(error) as caught:
            await provider.complete(chat())
        assert caught.value.status == status
        if fault == "429":
            assert caught.value.retry_after == pytest.approx(0.05)
        outcome = await provider.complete(chat())  # the next call is fine
        assert outcome.price is not None
        await provider.aclose()


async def test_envelope_success_false_is_retryable(sim: SimulatorThread) -> None:
    [orth, oai] = providers(sim)
    sim.books.configure({"script": [{"fault": "envelope"}]})
    with pytest.raises(RetryableError, match="simulated upstream failure"):
        await orth.complete(chat())
    await orth.aclose()
    await oai.aclose()


async def test_invalid_request_is_fatal_for_the_request(sim: SimulatorThread) -> None:
    for provider in providers(sim):
        with pytest.raises(RequestFatalError, match="temperature"):
            await provider.complete(chat({**BODY, "temperature": 9}))
        await provider.aclose()


async def test_bad_key_is_fatal_for_the_run_and_never_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with SimulatorThread(Books(api_key="the-right-key")) as server:
        for provider in providers(server):
            with pytest.raises(RunFatalError) as caught:
                await provider.complete(chat())
            assert caught.value.status == 401
            assert KEY not in str(caught.value)
            assert KEY not in repr(provider)
            await provider.aclose()
    assert KEY not in caplog.text
    assert KEY not in repr(http.Secret(KEY))


async def test_balance_exhaustion_is_402(sim: SimulatorThread) -> None:
    sim.books.configure({"balance": "0.000001"})
    for provider in providers(sim):
        with pytest.raises(RunFatalError) as caught:
            await provider.complete(chat())
        assert caught.value.status == 402
        await provider.aclose()
    assert sim.books.transactions == []


async def test_replies_match_the_official_openai_types(sim: SimulatorThread, write_job: Any) -> None:
    requests = [r for r in read_job("jobs/demo.jsonl") if isinstance(r, ChatRequest)]
    orth, oai = providers(sim)
    for request in requests:
        plain = {**request.body, "stream": False}
        plain.pop("stream_options", None)
        ChatCompletion.model_validate((await oai.complete(chat(plain))).completion)
        outcome = await orth.complete(chat(plain))
        ChatCompletion.model_validate(outcome.completion)
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"}
        ) as response:
            chunks = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate_json(c) for c in chunks[:-1]]
    assert parsed[-1].usage is not None and parsed[-1].choices == []
    await orth.aclose()
    await oai.aclose()


async def test_structured_outputs_tools_and_reasoning(sim: SimulatorThread) -> None:
    orth, oai = providers(sim)
    schema_body = {
        **BODY,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "q",
                "schema": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                },
            },
        },
    }
    content = (await orth.complete(chat(schema_body))).message["content"]
    parsed = json.loads(content)
    assert isinstance(parsed["a"], int) and isinstance(parsed["b"], str)
    tools_body = {
        **BODY,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        "tool_choice": "required",
    }
    outcome = await oai.complete(chat(tools_body))
    assert outcome.finish_reason == "tool_calls"
    assert outcome.message["tool_calls"][0]["function"]["name"] == "get_weather"
    reasoning = await orth.complete(chat({**BODY, "model": "zai-org/GLM-4.6", "reasoning_effort": "high"}))
    assert reasoning.message["reasoning_content"].startswith("[simulated reasoning]")
    assert reasoning.usage.reasoning_tokens > 0
    assert reasoning.usage.completion_tokens <= 40
    await orth.aclose()
    await oai.aclose()


async def test_streaming_is_assembled_with_usage_and_first_token_time(sim: SimulatorThread) -> None:
    sim.books.configure({"latency": "0.2"})
    orth, oai = providers(sim)
    body = {
        **BODY,
        "model": "zai-org/GLM-4.6",
        "stream": True,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }
    for provider in (orth, oai):
        outcome = await provider.complete(chat(body))
        assert outcome.usage.prompt_tokens > 0  # include_usage was added for us
        assert outcome.first_token_s is not None and 0.05 < outcome.first_token_s < outcome.latency_s
        assert json.loads(outcome.message["tool_calls"][0]["function"]["arguments"]).keys() == {"x"}
        assert outcome.message["reasoning_content"]
        assert outcome.price is not None and outcome.price > 0
    await orth.aclose()
    await oai.aclose()


async def test_models_balance_and_transactions(sim: SimulatorThread) -> None:
    orth, oai = providers(sim)
    assert await orth.models() == sorted(catalog.MODELS)
    assert await oai.models() == sorted(catalog.MODELS)
    outcome = await orth.complete(chat())
    assert await orth.balance() == Decimal(100) - outcome.price
    assert sim.books.stats()["counters"]["run.models"] == 1
    await orth.aclose()
    await oai.aclose()


bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(sorted(catalog.MODELS)),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=300)}),
            min_size=1,
            max_size=3,
        ),
        "max_tokens": st.integers(min_value=1, max_value=600),
    },
    optional={"temperature": st.floats(0, 2), "stop": st.sampled_from(["\n", "ipsum", "e"])},
)


@pytest.mark.parametrize("pricing", ["flat", "tokens"])
def test_dry_run_price_is_the_charge_or_a_bound(pricing: str) -> None:
    with SimulatorThread(Books(pricing=pricing)) as server:

        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(body=bodies)
        def check(body: dict[str, Any]) -> None:
            with httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer k"}) as client:
                envelope = {"api": "baseten", "path": "/v1/chat/completions", "body": body}
                quoted = Decimal(client.post("/v1/run", json={**envelope, "dryRun": True}).json()["price"])
                charged = Decimal(client.post("/v1/run", json=envelope).json()["price"])
            if pricing == "flat":
                assert quoted == charged == Decimal("0.01")
            else:
                assert 0 < charged <= quoted

        check()


def test_models_cli_lists_the_live_models_of_a_provider(
    sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = CliRunner().invoke(app, ["models", "--provider", "simulator", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == sorted(catalog.MODELS)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    result = CliRunner().invoke(
        app, ["models", "--provider", "openai", "--base-url", sim.base_url + "/v1", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == sorted(catalog.MODELS)
    assert sim.books.counters["openai.models"] == 1
    result = CliRunner().invoke(app, ["models", "--provider", "orthogonal"])
    assert result.exit_code == 2
    assert "ORTHOGONAL_API_KEY" in result.output


@pytest.mark.parametrize("name", ["orthogonal", "openai"])
async def test_two_hundred_streamed_requests_all_settle_with_nothing_possibly_billed(
    sim: SimulatorThread, write_job: Callable[..., Path], name: str
) -> None:
    """Whole SSE bodies arriving in one read once closed connections other requests had taken from
    the pool: every streamed request must end ok, with its usage, and nothing possibly billed."""
    sim.books.configure({"latency": "0.05-0.3"})
    lines = [
        {**BODY, "custom_id": f"s{i}", "stream": True, "messages": [{"role": "user", "content": f"q {i}"}]}
        for i in range(200)
    ]
    job = write_job(lines)
    orth, oai = providers(sim)
    provider = orth if name == "orthogonal" else oai
    try:
        result = await run_job(
            RunConfig(job=job, max_usd=Decimal(1), concurrency=100),
            conn=Connection(provider, name),
            ledger=Ledger(),
        )
    finally:
        await orth.aclose()
        await oai.aclose()
    assert result.states == {"ok": 200}
    frame = run_frame(Ledger(), result.run_id, ["status", "completion_tokens", "error_type"])
    assert frame["completion_tokens"].min() > 0
    assert frame["error_type"].null_count() == 200


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (429, "RATE_LIMITED", "http_429"),  # the status decides, whatever the code says
        (None, "RATE_LIMITED", "rate_limited"),
        (None, "SOMETHING_NEW", "provider_error"),
        (502, "UPSTREAM_ERROR", "http_502"),
    ],
)
def test_error_types_are_stable_names(status: int | None, code: str, expected: str) -> None:
    assert classify(status, "x", code=code).error_type == expected


async def test_dry_runs_share_the_runs_limits_where_the_provider_counts_them(sim: SimulatorThread) -> None:
    """One Limits for both phases: the Run API's dry runs are calls, paced by --rpm like the run's
    own; an OpenAI-compatible endpoint's quotes are a table lookup, not paced."""
    import time  # noqa: PLC0415

    from runner.app.quote import quote_requests  # noqa: PLC0415
    from runner.providers.limits import Limits  # noqa: PLC0415

    requests = [
        chat({**BODY, "messages": [{"role": "user", "content": f"q{i}"}]}, f"r{i}") for i in range(10)
    ]
    orth, oai = providers(sim)
    timings = {}
    for provider in (orth, oai):
        started = time.monotonic()
        estimate = await quote_requests(
            requests, Connection(provider, provider.name), Ledger(), limits=Limits(8, rpm=600)
        )
        timings[provider.name] = time.monotonic() - started
        assert estimate.unquoted_count == 0
    await orth.aclose()
    await oai.aclose()
    assert timings["orthogonal"] >= 0.9  # 10 dry runs at 10 a second, the bucket starting empty
    assert timings["openai"] < 0.5
    assert sim.books.stats()["counters"]["run.dry_run"] == 10


async def test_the_simulators_dry_runs_take_a_round_trip(sim: SimulatorThread) -> None:
    import time  # noqa: PLC0415

    sim.books.configure({"dry_run_latency": "0.2"})
    orth, oai = providers(sim)
    started = time.monotonic()
    quote = await orth.quote(chat())
    assert quote.exact and time.monotonic() - started >= 0.2
    await orth.aclose()
    await oai.aclose()


def test_the_simulator_command_is_realistic_by_default() -> None:
    from runner.cli.runs import SIMULATED_DRY_RUN_LATENCY, SIMULATED_LATENCY  # noqa: PLC0415
    from runner.simulator import parse_latency  # noqa: PLC0415

    assert parse_latency(SIMULATED_DRY_RUN_LATENCY)[1] > 0 and parse_latency(SIMULATED_LATENCY)[1] >= 0.5


async def test_identical_bodies_are_dry_run_once(sim: SimulatorThread) -> None:
    from runner.app.quote import quote_requests  # noqa: PLC0415

    requests = [chat(BODY, f"same{i}") for i in range(12)] + [chat({**BODY, "max_tokens": 7}, "other")]
    orth, oai = providers(sim)
    estimate = await quote_requests(requests, Connection(orth, "s"), Ledger())
    await orth.aclose()
    await oai.aclose()
    assert estimate.quote_calls == 2 and sim.books.stats()["counters"]["run.dry_run"] == 2
    assert estimate.per_model["openai/gpt-oss-120b"].requests == 13
