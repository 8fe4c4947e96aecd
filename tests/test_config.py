"""A run's settings are declared once (runner.core.config) and shared by the commands that take them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runner.cli.main import app
from runner.core.config import RESUME, RUN, SWEEP, RunConfig, flags_of
from runner.core.errors import ConfigError

cli = CliRunner()


def _flags(command: str) -> set[str]:
    text = cli.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
    return set(re.findall(r"--[a-z][a-z-]+", text))


def test_run_resume_and_sweep_take_the_run_flags_from_one_declaration() -> None:
    for command in (RUN, RESUME, SWEEP):
        declared = {name for _, spec, _ in flags_of(command) for name in spec.names if name.startswith("--")}
        declared = {n.split("/")[0] for n in declared}
        assert declared <= _flags(command), command
    shared = {"--concurrency", "--rpm", "--tpm", "--deadline", "--max-usd-per-hour", "--cache", "--grace"}
    assert all(shared <= _flags(c) for c in (RUN, RESUME, SWEEP))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"concurrency": 0}, "--concurrency"),
        ({"rpm": float("nan")}, "--rpm"),
        ({"grace_s": -1.0}, "--grace"),
        ({"cache": "sometimes"}, "--cache"),
        ({"max_usd": "lots"}, "--max-usd"),
        ({"deadline": "soon"}, "--deadline"),
        ({"read_timeout_s": 0.0}, "--timeout"),
    ],
)
def test_a_bad_setting_is_named_by_its_flag(flags: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        RunConfig.from_flags(Path("job.jsonl"), **flags)


def test_a_bad_flag_exits_2_before_anything_is_read(tmp_path: Path) -> None:
    done = cli.invoke(app, ["run", str(tmp_path / "missing.jsonl"), "--max-usd", "1", "--grace", "-5"])
    assert done.exit_code == 2
    assert "--grace cannot be negative" in done.output


def test_resume_keeps_the_runs_job_and_provider_and_applies_the_flags() -> None:
    made = RunConfig(job=Path("j.jsonl"), run_id="abc")
    resumed = made.with_flags(concurrency=7, read_timeout_s=5.0, deadline="1h")
    assert (resumed.job, resumed.run_id, resumed.concurrency) == (Path("j.jsonl"), "abc", 7)
    assert resumed.provider.timeouts.read_s == 5.0 and resumed.provider.max_connections == 7
    assert resumed.deadline is not None


@pytest.mark.parametrize("provider", ["openai", "orthogonal"])
def test_credentials_in_a_base_url_are_refused_without_showing_them(
    provider: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORTHOGONAL_API_KEY", "k")
    job = tmp_path / "j.jsonl"
    job.write_text('{"model": "openai/gpt-oss-120b", "messages": [{"role": "user", "content": "hi"}]}\n')
    url = "http://user:s3cr@t-pass@127.0.0.1:9/v1"
    done = cli.invoke(app, ["run", str(job), "--provider", provider, "--base-url", url, "--max-usd", "1"])
    assert done.exit_code == 2, done.output
    assert "carries credentials (http://****@127.0.0.1:9/v1)" in done.output
    assert "s3cr" not in done.output and "t-pass" not in done.output and "user:" not in done.output
    assert "Traceback" not in done.output
