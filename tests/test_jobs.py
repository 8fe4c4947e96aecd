"""Job files: the three line shapes and every kind of bad file."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from runner.cli.main import app
from runner.core.errors import JobError
from runner.core.jobs import JobChunks, JobSummary, count_lines, read_job, validate_job
from runner.core.models import ChatRequest
from tests.conftest import GOOD_BODY

cli = CliRunner()


def requests_of(path: Path) -> list[ChatRequest]:
    results = list(read_job(path))
    assert all(isinstance(r, ChatRequest) for r in results), results
    return [r for r in results if isinstance(r, ChatRequest)]


def test_plain_body_line(write_job: Callable[..., Path]) -> None:
    path = write_job([{**GOOD_BODY, "custom_id": "a", "metadata": {"k": 1}}, GOOD_BODY])
    first, second = requests_of(path)
    assert (first.custom_id, first.line, first.metadata) == ("a", 1, {"k": 1})
    assert "custom_id" not in first.body and "metadata" not in first.body
    assert second.custom_id == "2"  # defaults to the line number
    assert first.sha256 == second.sha256 and len(first.sha256) == 64


def test_openai_batch_line(write_job: Callable[..., Path]) -> None:
    line = {
        "custom_id": "req-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": GOOD_BODY,
    }
    [request] = requests_of(write_job([line]))
    assert request.custom_id == "req-1" and request.body == GOOD_BODY


def test_run_api_envelope_line(write_job: Callable[..., Path]) -> None:
    line = {
        "api": "baseten",
        "path": "/v1/chat/completions",
        "body": GOOD_BODY,
        "metadata": {"x": 1},
    }
    [request] = requests_of(write_job([line]))
    assert request.body == GOOD_BODY and request.metadata == {"x": 1}


def test_hash_ignores_key_order(write_job: Callable[..., Path]) -> None:
    reordered = dict(reversed(list(GOOD_BODY.items())))
    a, b = requests_of(write_job([GOOD_BODY, reordered]))
    assert a.sha256 == b.sha256


def test_bom_crlf_and_blank_lines(write_job: Callable[..., Path]) -> None:
    text = json.dumps(GOOD_BODY)
    path = write_job(["\ufeff" + text + "\r\n", "\r\n", "   \n", text + "\r\n"])
    assert [r.line for r in requests_of(path)] == [1, 4]


def test_a_long_integer_in_a_line_keeps_every_digit(write_job: Callable[..., Path]) -> None:
    seed = 123456789012345678901234567890  # past 64 bits: orjson alone would read it as a float
    long_line = json.dumps({**GOOD_BODY, "seed": seed, "metadata": {"n": 10**20}})
    [request] = requests_of(write_job([long_line]))
    assert request.body["seed"] == seed and request.metadata == {"n": 10**20}
    [plain] = requests_of(write_job([json.dumps({**GOOD_BODY, "seed": 7})]))
    assert plain.sha256 != request.sha256


TWICE_TOP = (
    b'{"model": "openai/gpt-oss-120b", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], '
    b'"max_tokens": 20}\n'
)
TWICE_INNER = (
    b'{"model": "openai/gpt-oss-120b", "messages": [{"role": "user", "role": "system", "content": "hi"}]}\n'
)
TWICE_SPACED = (
    b'{"model" : "openai/gpt-oss-120b", "messages" : [{"role" : "user", "content" : "hi"}], '
    b'"model" : "openai/gpt-oss-120b"}\n'
)
BAD_LINES: list[tuple[str, list[Any], str, str]] = [
    ("invalid json", [b'{"model": \n'], ":1: ", "not valid JSON"),
    ("not an object", [b"[1, 2]\n"], ":1: ", "must be a JSON object, not list"),
    ("non utf-8", [b'{"model": "\xff\xfe"}\n'], ":1: ", "not valid UTF-8"),
    (
        "unknown field",
        [{**GOOD_BODY, "temprature": 1}],
        ":1: temprature: ",
        "did you mean 'temperature'",
    ),
    (
        "unknown model",
        [{**GOOD_BODY, "model": "openai/gpt-oss-12b"}],
        ":1: model: ",
        "unknown model",
    ),
    (
        "duplicate id",
        [{**GOOD_BODY, "custom_id": "x"}, {**GOOD_BODY, "custom_id": "x"}],
        ":2: custom_id: ",
        "used by an earlier line (1)",
    ),
    (
        "batch wrong url",
        [{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": GOOD_BODY}],
        ":1: url: ",
        "is not /v1/chat/completions",
    ),
    (
        "batch no custom id",
        [{"method": "POST", "url": "/v1/chat/completions", "body": GOOD_BODY}],
        ":1: custom_id: ",
        "required",
    ),
    (
        "envelope no body",
        [{"api": "baseten", "path": "/v1/chat/completions"}],
        ":1: body: ",
        "required",
    ),
    (
        "envelope with dryRun",
        [{"api": "baseten", "path": "/v1/chat/completions", "body": GOOD_BODY, "dryRun": True}],
        ":1: dryRun: ",
        "unknown field",
    ),
    ("bad custom id", [{**GOOD_BODY, "custom_id": 7}], ":1: custom_id: ", "non-empty string"),
    ("bad metadata", [{**GOOD_BODY, "metadata": [1]}], ":1: metadata: ", "must be an object"),
    (
        "over-long prompt",
        [{**GOOD_BODY, "messages": [{"role": "user", "content": "x" * 600_000}]}],
        ":1: messages: ",
        "conservative estimate",
    ),
    (
        "temperature",
        [{**GOOD_BODY, "temperature": 5.2}],
        ":1: temperature: ",
        "5.2 is above the maximum 4.0",
    ),
    ("a key given twice", [TWICE_TOP], ":1: max_tokens: ", "given twice in the line"),
    ("a key given twice in a message", [TWICE_INNER], ":1: role: ", "given twice in the line"),
    ("a key given twice, spaced from its colon", [TWICE_SPACED], ":1: model: ", "given twice in the line"),
]


def test_keys_written_inside_strings_are_not_taken_for_duplicates(write_job: Callable[..., Path]) -> None:
    content = 'say {"max_tokens": 10, "max_tokens": 20} and \\u0022 "model" : x'
    path = write_job([{**GOOD_BODY, "messages": [{"role": "user", "content": content}]}])
    result = cli.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("name", "lines", "where", "fragment"), BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_files_exit_1_with_file_line_and_field(
    write_job: Callable[..., Path], name: str, lines: list[Any], where: str, fragment: str
) -> None:
    path = write_job(lines)
    result = cli.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    matching = [line for line in result.output.splitlines() if line.startswith(f"{path}{where}")]
    assert any(fragment in line for line in matching), result.output


def test_empty_file(write_job: Callable[..., Path]) -> None:
    path = write_job([])
    result = cli.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}: the job has no requests" in result.output


def test_missing_file(tmp_path: Path) -> None:
    result = cli.invoke(app, ["validate", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1
    assert "cannot read the job file" in result.output


def test_five_megabyte_line(write_job: Callable[..., Path]) -> None:
    big = {
        **GOOD_BODY,
        "model": "moonshotai/Kimi-K2.5",
        "messages": [{"role": "user", "content": "y" * 5_000_000}],
    }
    path = write_job([GOOD_BODY, big, GOOD_BODY])
    summary = validate_job(path)
    assert summary.issue_count == 1 and summary.requests == 2
    [issue] = summary.issues
    assert (issue.line, issue.field) == (2, "messages") and "context window" in issue.message


def test_every_error_is_collected_and_capped(write_job: Callable[..., Path]) -> None:
    path = write_job([{**GOOD_BODY, "temperature": 9}] * 30)
    result = cli.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert result.output.count("temperature: 9 is above the maximum 4.0") == 20
    assert "… and 10 more" in result.output


def test_validate_json_output(write_job: Callable[..., Path]) -> None:
    good = write_job([GOOD_BODY, {**GOOD_BODY, "model": "zai-org/GLM-4.6"}], name="good.jsonl")
    bad = write_job([{**GOOD_BODY, "n": 2}], name="bad.jsonl")
    result = cli.invoke(app, ["validate", "--json", str(good), str(bad)])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    first, second = doc["jobs"]
    assert first["ok"] and first["requests"] == 2
    assert first["per_model"] == {"openai/gpt-oss-120b": 1, "zai-org/GLM-4.6": 1}
    assert not second["ok"]
    assert second["errors"] == [
        {"file": str(bad), "line": 1, "field": "n", "message": "2 is not supported: only 1"}
    ]


@pytest.mark.parametrize("job", ["jobs/demo.jsonl", "jobs/openai-batch.jsonl"])
def test_shipped_jobs_are_valid(job: str) -> None:
    result = cli.invoke(app, ["validate", job])
    assert result.exit_code == 0, result.output
    assert "total" in result.output


def test_models_command_lists_the_catalog() -> None:
    result = cli.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    assert len(rows) == 8
    assert rows["moonshotai/Kimi-K2-Thinking"]["input_per_million"] == "unknown"
    assert rows["moonshotai/Kimi-K2-Thinking"]["always_reasons"] is True
    assert rows["openai/gpt-oss-120b"]["input_per_million"] == "$0.10"


def test_job_chunks_read_past_other_processes_chunks_without_parsing_them(tmp_path: Path) -> None:
    good = [json.dumps({**GOOD_BODY, "custom_id": f"c{i}"}) for i in range(1, 8)]
    raw = [good[0], good[1], "", "not json: chunk 1 belongs to another process", good[4], good[5], good[6]]
    job = tmp_path / "chunks.jsonl"
    job.write_text("\n".join(raw) + "\n")
    chunks = JobChunks(job, 3)
    first = chunks.take(0)
    assert first is not None and [r.line for r in first] == [1, 2]  # line 3 is blank
    last = chunks.take(2)
    assert last is not None and [(r.line, r.custom_id) for r in last] == [(7, "c7")]
    assert chunks.take(3) is None  # past the end
    with pytest.raises(ValueError, match="passed already"):
        chunks.take(1)
    chunks.close()

    again = JobChunks(job, 3)
    with pytest.raises(JobError, match="changed while it was being read"):
        again.take(1)  # a line of one's own chunk that no longer parses
    again.close()


def test_a_summary_made_in_another_process_reads_back_the_same(write_job: Callable[..., Path]) -> None:
    lines = [{**GOOD_BODY, "custom_id": f"c{i}"} for i in range(5)]
    lines[1]["temperature"] = 9
    lines[3]["custom_id"] = "c0"
    summary = validate_job(write_job(lines))
    again = JobSummary.from_json(json.loads(json.dumps(summary.to_json())))
    assert again == summary
    assert not again.ok and again.issue_count == 2 and again.digest == summary.digest


def test_count_lines_counts_a_last_line_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    for text, expected in [("", 0), ("a\n", 1), ("a\n\nb", 3), ("a\nb\n", 2)]:
        path.write_text(text)
        assert count_lines(path) == expected
    assert count_lines(tmp_path / "missing.jsonl") == 0


def test_hostile_lines_are_line_errors_never_tracebacks(write_job: Callable[..., Path]) -> None:
    good = '{"model": "openai/gpt-oss-120b", "messages": [{"role": "user", "content": "hi"}]}\n'
    deep = '{"model": "openai/gpt-oss-120b", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    job = write_job(
        [
            good.replace('"hi"', '"\\ud800 alone"'),
            deep,
            good.replace('"model"', '"\\u001b[31mred\\u001b[0m": 1, "model"'),
            good.replace('"hi"', '"nested"').replace(
                "}]}", '}], "metadata": ' + '{"a": ' * 80 + "1" + "}" * 80 + "}"
            ),
        ]
    )
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert ":1: a lone surrogate (\\ud800) is not text" in result.output
    assert ":2: JSON nested more than 64 levels deep" in result.output
    assert ":3: \\x1b[31mred\\x1b[0m: unknown field" in result.output
    assert "\x1b" not in result.output
    assert ":4: JSON nested more than 64 levels deep" in result.output


def test_a_file_without_line_ends_is_not_read_into_memory(tmp_path: Path) -> None:
    """A 64 MiB file with no line end (sparse: zeros): the first 16 MiB are found too long for a line,
    and nothing more is read (the process stays small and ends). A device such as /dev/zero is not
    read at all."""
    endless = tmp_path / "zeros.jsonl"
    with endless.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    command = [sys.executable, "-m", "runner", "validate", str(endless)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 1, done.stderr
    assert f"{endless}:1: longer than 16,777,216 bytes (--max-line-bytes)" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30
    assert usage.ru_maxrss < 400 * 1024  # KiB: the interpreter and its libraries, one bounded line
    device = subprocess.run(
        [*command[:-1], "/dev/zero"], capture_output=True, text=True, timeout=60, check=False
    )
    assert device.returncode == 1
    assert "/dev/zero: the job file is not a regular file: give a regular file" in device.stderr


def test_max_line_bytes_can_be_raised_or_lowered(write_job: Callable[..., Path]) -> None:
    line = {"model": "openai/gpt-oss-120b", "messages": [{"role": "user", "content": "x" * 2000}]}
    job = write_job([line])
    assert CliRunner().invoke(app, ["validate", str(job)]).exit_code == 0
    result = CliRunner().invoke(app, ["validate", str(job), "--max-line-bytes", "1000"])
    assert result.exit_code == 1
    assert "longer than 1,000 bytes" in result.output
    result = CliRunner().invoke(app, ["validate", str(job), "--max-line-bytes", "0"])
    assert result.exit_code == 2
