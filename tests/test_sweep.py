"""Sweeps: spec checks, the cost matrix, --fit, judges, incremental re-runs, results and report."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from runner.cli.main import app
from runner.ledger import Ledger
from tests.conftest import SimulatorThread

cli = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[1] / "jobs" / "sweep" / "capitals.toml"
ENV = {"ORTHOGONAL_API_KEY": "k", "COLUMNS": "200"}
MODELS = '["openai/gpt-oss-120b", "deepseek-ai/DeepSeek-V3.1"]'


def calls(sim: SimulatorThread) -> int:
    return int(sim.books.stats()["counters"].get("run.call", 0))


def dry_runs(sim: SimulatorThread) -> int:
    return int(sim.books.stats()["counters"].get("run.dry_run", 0))


def sweep(sim: SimulatorThread, spec: Path, tmp_path: Path, *args: str) -> Any:
    base = ["sweep", str(spec), "--provider", "orthogonal", "--base-url", sim.base_url]
    return cli.invoke(app, [*base, "-o", str(tmp_path / "out" / "sweep.parquet"), *args], env=ENV)


def write_spec(tmp_path: Path, body: str, rows: int = 10) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "topic": f"topic {i}", "expected": "yes"}) + "\n" for i in range(rows)
        )
    )
    spec = tmp_path / "spec.toml"
    spec.write_text(f'dataset = "data.jsonl"\n{body}')
    return spec


PROMPT = '[prompt]\nuser = "Say something about {topic}."\n'
GRADERS = f"{PROMPT}[matrix]\nmodel = {MODELS}\n[[graders]]\n"


def test_the_readme_example_estimates_runs_and_writes_40_graded_rows(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    estimate = sweep(sim, EXAMPLE, tmp_path, "--estimate", "--json")
    assert estimate.exit_code == 0, estimate.output
    matrix = json.loads(estimate.stdout)
    assert matrix["requests"] == 40 and len(matrix["cells"]) == 4
    assert all(c["requests"] == 10 and c["fits"] for c in matrix["cells"])
    assert calls(sim) == 0  # priced from dry runs, nothing sent
    quoted = Decimal(matrix["quoted_usd"])
    assert 0 < Decimal(matrix["expected_usd"]) <= quoted  # the expected cost beside the bound
    assert all(Decimal(c["expected_usd"]) <= Decimal(c["quoted_usd"]) for c in matrix["cells"])

    done = sweep(sim, EXAMPLE, tmp_path, "--max-usd", "0.10", "--html", str(tmp_path / "r.html"))
    assert done.exit_code == 0, done.output
    assert "cost matrix" in done.output and "exact (95% CI)" in done.output
    frame = pl.read_parquet(tmp_path / "out" / "sweep.parquet")
    assert frame.height == 40
    assert {"model", "temperature", "score_exact", "row_id", "country", "expected"} <= set(frame.columns)
    assert sorted(frame["temperature"].unique().to_list()) == [0.0, 0.7]
    assert frame["score_exact"].is_in([0.0, 1.0]).all()
    assert Decimal(frame["price_usd"].sum()) <= quoted
    assert Decimal(frame["price_usd"].sum()) * 10**9 == sim.books.charged_nanos
    page = (tmp_path / "r.html").read_text()
    assert "<svg" in page and "model=openai/gpt-oss-120b" in page
    job = next((tmp_path / "out").glob("capitals-*.jsonl"))  # the expanded job, beside the results
    again = cli.invoke(app, ["validate", str(job)])
    assert again.exit_code == 0, again.output

    run_id = Ledger().runs()[0].id  # `runner report` on the sweep's run: the cells compared too
    shown = cli.invoke(app, ["report", run_id, "--html", str(tmp_path / "s.html")], env=ENV)
    assert shown.exit_code == 0, shown.output
    assert "sweep capitals: cells" in shown.output and "exact (95% CI)" in shown.output
    assert "cost against score" in (tmp_path / "s.html").read_text()
    document = json.loads(cli.invoke(app, ["report", run_id, "--json"], env=ENV).stdout)
    assert len(document["cells"]) == 4 and all(c["n"] == 10 for c in document["cells"])


def test_fit_keeps_the_same_rows_in_every_cell(sim: SimulatorThread, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, f"{PROMPT}[matrix]\nmodel = {MODELS}\nmax_tokens = 50\n")
    matrix = json.loads(sweep(sim, spec, tmp_path, "--estimate", "--json").stdout)
    half = Decimal(matrix["quoted_usd"]) / 2
    refused = sweep(sim, spec, tmp_path, "--max-usd", f"{half:f}")
    assert refused.exit_code == 3 and "short by" in refused.output
    assert calls(sim) == 0
    fitted = sweep(sim, spec, tmp_path, "--max-usd", f"{half:f}", "--fit")
    assert fitted.exit_code == 0, fitted.output
    frame = pl.read_parquet(tmp_path / "out" / "sweep.parquet")
    rows_per_cell = {cell: set(g["row_id"].to_list()) for (cell,), g in frame.group_by("cell")}
    assert len(rows_per_cell) == 2
    first, second = rows_per_cell.values()
    assert first == second and 0 < len(first) < 10
    assert f"--fit: {len(first)} of 10 dataset rows fit" in fitted.output
    assert Decimal(frame["price_usd"].sum()) <= half


def test_a_judge_is_quoted_held_and_reported_apart(sim: SimulatorThread, tmp_path: Path) -> None:
    judge = (
        '[[graders]]\nkind = "judge"\nname = "judge"\nmodel = "openai/gpt-oss-120b"\nmax_tokens = 30\n'
        'rubric = "Is this about {topic}? {answer} Score 0 or 1."\n'
    )
    spec = write_spec(tmp_path, f"{PROMPT}[matrix]\nmodel = {MODELS}\nmax_tokens = 20\n{judge}", rows=5)
    matrix = json.loads(sweep(sim, spec, tmp_path, "--estimate", "--json").stdout)
    assert Decimal(matrix["judges_usd"]) > 0  # priced before anything is sent
    Ledger().create_budget("eval", 10**9)
    done = sweep(sim, spec, tmp_path, "--budget", "eval", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    frame = pl.read_parquet(tmp_path / "out" / "sweep.parquet")
    assert frame.height == 10 and frame["judge_explanation"].null_count() == 0
    assert calls(sim) == 20  # 10 answers, 10 judgements
    cells = Decimal(sum(Decimal(c["spent_usd"]) for c in report["cells"]))
    judges = Decimal(sum(Decimal(c["judge_cost_usd"]) for c in report["cells"]))
    assert judges > 0
    spent = Ledger().budget("eval").spent_nanos
    assert (cells + judges) * 10**9 == spent == sim.books.charged_nanos  # to the nano-dollar
    # the simulator's judge writes words, no score: each is a failed grade, said and counted
    scored = frame.filter(pl.col("score_judge").is_not_null()).height
    assert frame.filter(pl.col("judge_error").is_not_null()).height == 10 - scored
    assert sum(c["judge_unscored"] for c in report["cells"]) == 10 - scored
    shown = sweep(sim, spec, tmp_path, "--budget", "eval")
    assert f"judge: {10 - scored} answer(s) got no score" in shown.output or scored == 10


def test_a_third_model_sends_only_its_own_requests(sim: SimulatorThread, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, f"{PROMPT}[matrix]\nmodel = {MODELS}\nmax_tokens = 20\n")
    assert sweep(sim, spec, tmp_path, "--max-usd", "1").exit_code == 0
    assert calls(sim) == 20
    three = MODELS.replace("]", ', "zai-org/GLM-4.6"]')
    spec.write_text(spec.read_text().replace(MODELS, three))
    again = sweep(sim, spec, tmp_path, "--max-usd", "1")
    assert again.exit_code == 0, again.output
    assert calls(sim) == 30  # only the new model's 10
    frame = pl.read_parquet(tmp_path / "out" / "sweep.parquet")
    assert frame.height == 30 and frame.filter(pl.col("cached")).height == 20
    # the comparison prices the reused answers at what they cost when bought; this run spent nothing on them
    report = json.loads(sweep(sim, spec, tmp_path, "--max-usd", "1", "--json").stdout)
    old = [c for c in report["cells"] if "GLM" not in c["cell"]]
    assert all(Decimal(c["cost_usd"]) > 0 and Decimal(c["spent_usd"]) == 0 for c in old)
    assert calls(sim) == 30


def test_repeats_are_samples_each_sent(sim: SimulatorThread, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, f'{PROMPT}[matrix]\nmodel = ["openai/gpt-oss-120b"]\nrepeats = 3\n', rows=2)
    assert sweep(sim, spec, tmp_path, "--max-usd", "1").exit_code == 0
    assert calls(sim) == 6
    frame = pl.read_parquet(tmp_path / "out" / "sweep.parquet")
    assert sorted(frame["repeat"].to_list()) == [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (f"{PROMPT}[matrix]\nmodel = {MODELS}\ncolour = [1]\n", "matrix.colour: not a request field"),
        (f"{PROMPT}[matrix]\nmodel = {MODELS}\n[extra]\nx = 1\n", "extra: unknown key"),
        (
            '[prompt]\nuser = "About {nothing}."\n[matrix]\nmodel = ["openai/gpt-oss-120b"]\n',
            "row r0: the placeholder {nothing}",
        ),
        (f"{PROMPT}[matrix]\nmodel = []\n", "matrix.model: the [matrix] needs at least one model"),
        (f"{PROMPT}[matrix]\nmodel = {MODELS}\ntemperature = []\n", "matrix.temperature: an empty list"),
        (
            f'{PROMPT}[matrix]\nmodel = {MODELS}\n[[graders]]\nkind = "vibes"\n',
            "graders[0].kind: 'vibes' is not one of",
        ),
        (
            f'{PROMPT}[matrix]\nmodel = {MODELS}\n[[graders]]\nkind = "regex"\npattern = "(unclosed"\n',
            "graders[0].pattern: does not compile",
        ),
        (
            f'{GRADERS}kind = "judge"\nmodel = "no/such"\nrubric = "{{answer}}"\n',
            "graders[0].model: 'no/such' is not a model of the catalog",
        ),
    ],
)
def test_bad_specs_name_the_file_and_key_and_send_nothing(
    sim: SimulatorThread, tmp_path: Path, body: str, expected: str
) -> None:
    spec = write_spec(tmp_path, body)
    result = sweep(sim, spec, tmp_path, "--max-usd", "1")
    assert result.exit_code == 1, result.output
    assert str(spec) in result.output and expected in result.output
    assert "Traceback" not in result.output
    assert calls(sim) == 0 and dry_runs(sim) == 0


def test_the_python_api_returns_the_result_frame(tmp_path: Path) -> None:
    import runner  # noqa: PLC0415

    frame = runner.sweep_simulated(EXAMPLE, max_usd="0.10", folder=tmp_path)
    assert frame.height == 40 and "score_exact" in frame.columns


def test_rule_graders_score_an_answer() -> None:
    from runner.app.sweep import Grader  # noqa: PLC0415

    row = {"expected": "Paris"}
    assert Grader("e", "exact", {"ignore_case": True}).score(" paris\n", row) == 1.0
    assert Grader("e", "exact", {}).score("paris", row) == 0.0
    assert Grader("c", "contains", {"value": "Par"}).score("It is Paris.", row) == 1.0
    assert Grader("r", "regex", {"pattern": r"^\d+$"}).score("42", row) == 1.0
    assert Grader("j", "json_valid", {}).score('{"a": 1}', row) == 1.0
    assert Grader("j", "json_valid", {}).score("{a: 1}", row) == 0.0
    schema = {"type": "object", "required": ["city"]}
    assert Grader("s", "json_schema", {"schema": schema}).score('{"city": "Paris"}', row) == 1.0
    assert Grader("s", "json_schema", {"schema": schema}).score('{"town": "Paris"}', row) == 0.0
    assert Grader("e", "exact", {}).score(None, row) is None  # no answer: no score


def test_a_csv_dataset_and_a_cell_over_its_budget(sim: SimulatorThread, tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("id,topic\na,cats\nb,dogs\n")
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'dataset = "rows.csv"\n{PROMPT}[matrix]\nmodel = {MODELS}\n[budget]\nper_cell_usd = 0.0000001\n'
    )
    matrix = json.loads(sweep(sim, spec, tmp_path, "--estimate", "--json").stdout)
    assert matrix["rows"] == 2 and [c["fits"] for c in matrix["cells"]] == [False, False]
    refused = sweep(sim, spec, tmp_path, "--max-usd", "1")
    assert (
        refused.exit_code == 3
        and "over budget.per_cell_usd" in refused.output
        and "short by" in refused.output
    )
    assert calls(sim) == 0


def test_cache_refresh_buys_the_unchanged_cells_again(sim: SimulatorThread, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, f'{PROMPT}[matrix]\nmodel = ["openai/gpt-oss-120b"]\n', rows=3)
    assert sweep(sim, spec, tmp_path, "--max-usd", "1").exit_code == 0
    spec.write_text(spec.read_text().replace('["openai/gpt-oss-120b"]', MODELS))
    again = sweep(sim, spec, tmp_path, "--max-usd", "1", "--cache", "refresh")
    assert again.exit_code == 0, again.output
    assert calls(sim) == 3 + 6  # the first model's answers bought again, with the new model's


@pytest.mark.parametrize(
    ("csv_text", "expected"),
    [
        ("id,topic\na,cats\nb\n", "rows.csv:3: 1 fields where the header has 2"),
        ("id,topic\na,cats,extra\n", "rows.csv:2: 3 fields where the header has 2"),
        ('id,topic\na,"cats\n', "rows.csv:2: not valid CSV: unexpected end of data"),
        ("id,topic\na,ca\x00ts\n", "rows.csv:2: a NUL byte in a field"),
    ],
)
def test_a_ragged_or_damaged_csv_row_is_named_and_nothing_is_sent(
    sim: SimulatorThread, tmp_path: Path, csv_text: str, expected: str
) -> None:
    (tmp_path / "rows.csv").write_text(csv_text)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'dataset = "rows.csv"\n{PROMPT}[matrix]\nmodel = {MODELS}\n')
    result = sweep(sim, spec, tmp_path, "--max-usd", "1")
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert "None" not in result.output and "Traceback" not in result.output
    assert calls(sim) == 0 and dry_runs(sim) == 0


def test_a_dataset_or_job_that_is_a_pipe_is_refused_at_once(sim: SimulatorThread, tmp_path: Path) -> None:
    import os  # noqa: PLC0415

    os.mkfifo(tmp_path / "rows.jsonl")  # nobody writes it: reading it would block forever
    spec = tmp_path / "spec.toml"
    spec.write_text(f'dataset = "rows.jsonl"\n{PROMPT}[matrix]\nmodel = {MODELS}\n')
    result = sweep(sim, spec, tmp_path, "--max-usd", "1")
    assert result.exit_code == 1, result.output
    assert "the dataset file is a pipe: give a regular file" in result.output
    job = tmp_path / "job.jsonl"
    os.mkfifo(job)
    for command in (["validate", str(job)], ["run", str(job), "--provider", "simulator", "--max-usd", "1"]):
        done = cli.invoke(app, command, env=ENV)
        assert done.exit_code == 1, done.output
        assert "the job file is a pipe: give a regular file" in done.output
    assert Ledger().runs() == []  # nothing prepared, nothing left behind
    assert calls(sim) == 0 and dry_runs(sim) == 0


def test_a_huge_expansion_is_refused_with_its_product_before_anything_grows(tmp_path: Path) -> None:
    """`repeats = 1000000000` once grew to 16 GB; under a 1 GiB address-space limit it is refused at once
    with the product named, exit 1, no MemoryError."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    spec = write_spec(tmp_path, f"{PROMPT}[matrix]\nmodel = {MODELS}\nrepeats = 1000000000\n")
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
    code = limit + "from runner.cli.main import main; main()"
    args = ["sweep", str(spec), "--provider", "simulator", "--max-usd", "1"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert "2 cells × 1,000,000,000 repeats = 2,000,000,000 requests a dataset row" in done.stderr
    assert "MemoryError" not in done.stderr and "Traceback" not in done.stderr
    # within the matrix's bound, the rows make it too big: counted before the job is written
    spec = write_spec(tmp_path, f"{PROMPT}[matrix]\nmodel = {MODELS}\nrepeats = 2000000\n", rows=2)
    done = subprocess.run(
        [sys.executable, "-c", code, "sweep", str(spec), "--provider", "simulator", "--estimate"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "2 rows × 2 cells × 2,000,000 repeats = 8,000,000 requests, above the 5,000,000" in done.stderr
    assert not list(tmp_path.glob("results/*.jsonl"))  # no job was written


def test_a_regex_that_backtracks_without_end_fails_its_grade_in_bounded_time() -> None:
    import time  # noqa: PLC0415

    from runner.app.sweep import REGEX_TIMEOUT_S, Grader  # noqa: PLC0415

    grader = Grader("r", "regex", {"pattern": r"(a|aa)+$"})  # alternatives that overlap: exponential
    started = time.monotonic()
    score, failed = grader.grade("a" * 60 + "b", {})  # almost matches: `re` would run for ages
    assert time.monotonic() - started < REGEX_TIMEOUT_S + 5
    assert score is None and failed is not None and "took over 1 s" in failed
    assert grader.grade("aaaa", {}) == (1.0, None)
    assert grader.grade("aaab", {}) == (0.0, None)
    assert grader.grade("bbbb", {}) == (0.0, None)
