"""Paired statistics for sweeps, checked against scipy.stats and statsmodels: reducers over repeats,
pass@k's closed form, paired differences with their intervals, McNemar's exact test, Holm's
adjustment, and the rows a comparison needs (planning before spending)."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sp
from statsmodels.stats.multitest import multipletests
from typer.testing import CliRunner

from runner.app import stats
from runner.app.compare import compare
from runner.app.sweep import load_spec
from runner.cli.main import app
from runner.simulator.fakes import generate

cli = CliRunner()
TOL = 1e-9


# ---- the statistics alone ----------------------------------------------------------------------


@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_chance_that_k_samples_drawn_without_replacement_hold_a_pass(
    case: tuple[int, int, int],
) -> None:
    n, c, k = case
    samples = [1] * c + [0] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in draw) for draw in draws) / len(draws)
    assert stats.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert stats.reduce_scores([float(s) for s in samples], "pass@k", k) == pytest.approx(brute, abs=1e-12)


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=9), st.integers(1, 9))
def test_the_reducers_of_pass_fail_repeats(scores: list[float], k: int) -> None:
    passed = sum(scores)
    assert stats.reduce_scores(scores, "mean") == pytest.approx(passed / len(scores))
    assert stats.reduce_scores(scores, "max") == (1.0 if passed else 0.0)
    assert stats.reduce_scores(scores, "majority") == (1.0 if passed * 2 > len(scores) else 0.0)
    assert stats.reduce_scores(scores, "at_least_k", k) == (1.0 if passed >= k else 0.0)
    assert stats.reduce_scores([], "mean") is None


def test_the_paired_t_interval_and_p_match_scipy() -> None:
    a = [0.9, 0.4, 0.75, 0.6, 0.8, 0.3, 0.55, 0.95, 0.7, 0.65]
    b = [0.7, 0.5, 0.6, 0.4, 0.75, 0.35, 0.5, 0.8, 0.5, 0.6]
    result = stats.paired(a, b)
    test = sp.ttest_rel(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    low, high = sp.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / len(diffs), scale=sp.sem(diffs))
    assert result.test == "paired_t"
    assert result.p == pytest.approx(test.pvalue, abs=TOL)
    assert (result.low, result.high) == (pytest.approx(low, abs=TOL), pytest.approx(high, abs=TOL))
    single = stats.mean_interval(a)
    assert single is not None
    expected = sp.t.interval(0.95, len(a) - 1, loc=sum(a) / len(a), scale=sp.sem(a))
    assert (single.low, single.high) == (
        pytest.approx(expected[0], abs=TOL),
        pytest.approx(expected[1], abs=TOL),
    )


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs() -> None:
    a = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    b = [0, 1, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    result = stats.paired([float(x) for x in a], [float(y) for y in b])
    wins = sum(x > y for x, y in zip(a, b, strict=True))
    losses = sum(x < y for x, y in zip(a, b, strict=True))
    assert result.test == "mcnemar_exact"
    assert result.p == pytest.approx(sp.binomtest(wins, wins + losses, 0.5).pvalue, abs=TOL)


def test_holm_matches_statsmodels() -> None:
    pvalues = [0.01, 0.04, 0.03, 0.2, 0.005, None, 0.5]
    given_p = [p for p in pvalues if p is not None]
    expected = iter(multipletests(given_p, method="holm")[1])
    adjusted = stats.holm(pvalues)
    for p, q in zip(pvalues, adjusted, strict=True):
        assert (q is None) if p is None else q == pytest.approx(next(expected), abs=TOL)


def test_rows_needed_fall_with_the_square_of_the_difference() -> None:
    small, large = stats.rows_needed(0.05, 0.5), stats.rows_needed(0.10, 0.5)
    assert 3.8 <= small / large <= 4.2
    z = sp.norm.ppf(0.975) + sp.norm.ppf(0.8)
    assert small == math.ceil((z * 0.5 / 0.05) ** 2)
    assert stats.detectable(small, 0.5) <= 0.05


def test_cells_that_share_no_rows_are_said_to_instead_of_compared(tmp_path: Path) -> None:
    spec = _spec(tmp_path, rows=6)
    a, b = (
        "model=openai/gpt-oss-120b,max_tokens=16,temperature=0",
        "model=openai/gpt-oss-120b,max_tokens=16,temperature=1",
    )
    frame = pl.DataFrame(
        {
            "cell": [a] * 3 + [b] * 3,
            "row_id": ["r0", "r1", "r2", "r3", "r4", "r5"],
            "score_hit": [1.0, 0.0, 1.0, 0.0, 1.0, 1.0],
            "score_hit2": [1.0, 0.0, 1.0, 0.0, 1.0, 1.0],
        }
    )
    found = [c for c in compare(frame, spec) if {c.a, c.b} == {a, b}]
    assert found and all(c.rows == 0 and c.difference is None and c.p is None for c in found)
    assert "share no answered row: no paired comparison" in found[0].sentence()


def test_the_simulator_samples_afresh_at_a_temperature_without_a_seed() -> None:
    body = {"model": "openai/gpt-oss-120b", "max_tokens": 30, "messages": [{"role": "user", "content": "q"}]}
    answers = {generate({**body, "temperature": 1.0}, None).content for _ in range(8)}
    assert len(answers) > 1
    for fixed in ({**body, "temperature": 0}, {**body, "temperature": 1.0, "seed": 7}, body):
        assert len({generate(fixed, None).content for _ in range(5)}) == 1


# ---- a sweep end to end on the simulator -----------------------------------------------------------

MODELS = '["openai/gpt-oss-120b", "deepseek-ai/DeepSeek-V3.1"]'


def _spec(tmp_path: Path, rows: int = 40, extra: str = "") -> Any:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "topic": f"topic {i}"}) + "\n" for i in range(rows)))
    path = tmp_path / "spec.toml"
    path.write_text(
        'dataset = "data.jsonl"\n'
        f"{extra}"
        '[prompt]\nuser = "Tell me about {topic}."\n'
        f"[matrix]\nmodel = {MODELS}\ntemperature = [0, 1]\nmax_tokens = [16]\nrepeats = 3\n"
        '[[graders]]\nname = "hit"\nkind = "contains"\nvalue = "tide"\nreduce = "majority"\n'
        '[[graders]]\nname = "hit2"\nkind = "contains"\nvalue = "tide"\nreduce = "pass@k"\nk = 2\n'
    )
    return load_spec(path)


def _sweep(tmp_path: Path, *args: str) -> Any:
    spec = tmp_path / "spec.toml"
    out = ["-o", str(tmp_path / "out" / "sweep.parquet")]
    return cli.invoke(
        app, ["sweep", str(spec), "--provider", "simulator", *out, *args], env={"COLUMNS": "200"}
    )


def test_a_sweep_with_repeats_compares_its_cells_paired_as_scipy_does(tmp_path: Path) -> None:
    _spec(tmp_path)
    done = _sweep(tmp_path, "--max-usd", "1", "--json")
    assert done.exit_code == 0, done.output
    document = json.loads(done.stdout)
    frame = pl.read_parquet(tmp_path / "out" / "sweep.parquet")
    assert frame.height == 2 * 2 * 40 * 3
    # each (cell, row): its three repeats, reduced as the graders say, recomputed from the Parquet
    repeats: dict[tuple[str, str], list[float]] = defaultdict(list)
    for cell, row, score in frame.select("cell", "row_id", "score_hit").iter_rows():
        repeats[(cell, row)].append(score)
    majority = {key: float(sum(v) * 2 > len(v)) for key, v in repeats.items()}
    pass2 = {key: 1 - math.comb(3 - int(sum(v)), 2) / math.comb(3, 2) for key, v in repeats.items()}
    cells = {c["cell"]: c for c in document["cells"]}
    for name, cell in cells.items():
        rows = [v for (c, _), v in pass2.items() if c == name]
        assert cell["n_hit2"] == 40 and cell["mean_hit2"] == pytest.approx(sum(rows) / 40, abs=TOL)
        assert (
            cell["low_hit2"] < cell["mean_hit2"] < cell["high_hit2"] or cell["low_hit2"] == cell["high_hit2"]
        )
    # the answers vary between repeats only where the temperature is above 0
    varied = {c for (c, _), v in repeats.items() if len(set(v)) > 1}
    assert varied and all("temperature=1" in c for c in varied)
    comparisons = document["comparisons"]
    tested = 0
    assert len(comparisons) == 4 * 2  # pairs differing in one field, for each grader
    for c in comparisons:
        assert set(c) == {
            "a",
            "b",
            "grader",
            "rows",
            "difference",
            "low",
            "high",
            "test",
            "p",
            "p_holm",
            "cost_ratio",
        }
        scores = majority if c["grader"] == "hit" else pass2
        a = [scores[(c["a"], f"r{i}")] for i in range(40)]
        b = [scores[(c["b"], f"r{i}")] for i in range(40)]
        assert c["rows"] == 40
        assert c["difference"] == pytest.approx(sum(a) / 40 - sum(b) / 40, abs=TOL)
        if set(a + b) <= {0.0, 1.0}:  # pass/fail rows (majority; pass@2 of identical repeats): McNemar
            wins = sum(x > y for x, y in zip(a, b, strict=True))
            losses = sum(x < y for x, y in zip(a, b, strict=True))
            assert c["test"] == "mcnemar_exact"
            expected = 1.0 if not wins + losses else sp.binomtest(wins, wins + losses, 0.5).pvalue
            assert c["p"] == pytest.approx(expected, abs=TOL)
        else:  # pass@2 of varied repeats is a fraction: the paired t test
            assert c["test"] == "paired_t"
            assert c["p"] == pytest.approx(sp.ttest_rel(a, b).pvalue, abs=TOL)
            tested += 1
    assert tested  # both tests were checked
    holm = multipletests([c["p"] for c in comparisons], method="holm")[1]
    assert [c["p_holm"] for c in comparisons] == pytest.approx(list(holm), abs=TOL)
    # the terminal says it in words, the HTML draws it
    shown = _sweep(tmp_path, "--max-usd", "1", "--html", str(tmp_path / "s.html"))
    assert shown.exit_code == 0, shown.output
    assert "paired comparisons" in shown.output and "a/b $ per correct" in shown.output
    assert "no detectable difference" in shown.output or "beats" in shown.output
    page = (tmp_path / "s.html").read_text()
    assert "paired differences between cells" in page and page.count("<circle") >= 8


def test_plan_says_the_rows_and_money_each_pair_needs(tmp_path: Path) -> None:
    _spec(tmp_path, rows=20)
    first = _sweep(tmp_path, "--plan", "--detect", "0.05", "--json")
    assert first.exit_code == 0, first.output
    plan = json.loads(first.stdout)
    assert plan["pairs"] and all(p["sd_from"] == "default" for p in plan["pairs"])
    assert all(p["rows"] == stats.rows_needed(0.05, stats.DEFAULT_SD) for p in plan["pairs"])
    assert all(float(p["a_usd"]) > 0 and float(p["b_usd"]) > 0 for p in plan["pairs"])
    wider = json.loads(_sweep(tmp_path, "--plan", "--detect", "0.10", "--json").stdout)
    assert 3.5 <= plan["rows"] / wider["rows"] <= 4.5  # twice the difference, a quarter of the rows
    budgeted = json.loads(
        _sweep(tmp_path, "--plan", "--detect", "0.05", "--max-usd", "0.001", "--json").stdout
    )
    assert budgeted["budget_rows"] is not None and budgeted["budget_rows"] <= 20
    text = _sweep(tmp_path, "--plan", "--detect", "0.05", "--max-usd", "0.001")
    assert "rows needed" in text.output and "the smallest difference it detects is" in text.output
    assert "sd 0.5 taken" in text.output
    # after a run of the spec, its spread is used
    assert _sweep(tmp_path, "--max-usd", "1").exit_code == 0
    after = json.loads(_sweep(tmp_path, "--plan", "--detect", "0.05", "--json").stdout)
    assert any(p["sd_from"].startswith("run ") for p in after["pairs"])


def test_a_spec_baseline_compares_every_cell_with_it(tmp_path: Path) -> None:
    base = "model=openai/gpt-oss-120b,max_tokens=16,temperature=0"
    _spec(tmp_path, rows=6, extra=f'baseline = "{base}"\n')
    done = _sweep(tmp_path, "--max-usd", "1", "--json")
    assert done.exit_code == 0, done.output
    comparisons = json.loads(done.stdout)["comparisons"]
    assert len(comparisons) == 3 * 2 and all(c["b"] == base for c in comparisons)
    bad = _sweep(tmp_path, "--estimate", "--baseline", "model=nope")
    assert bad.exit_code == 2 and "--baseline: 'model=nope' is not a cell of the matrix" in bad.output


def test_fit_with_detect_runs_just_the_rows_needed(tmp_path: Path) -> None:
    _spec(tmp_path, rows=40)
    needed = stats.rows_needed(0.3, stats.DEFAULT_SD)
    assert needed < 40
    done = _sweep(tmp_path, "--max-usd", "1", "--fit", "--detect", "0.3")
    assert done.exit_code == 0, done.output
    assert f"--fit --detect: the first {needed} of 40 dataset rows" in done.output
    frame = pl.read_parquet(tmp_path / "out" / "sweep.parquet")
    assert frame["row_id"].n_unique() == needed and frame.height == needed * 4 * 3
