"""`runner report --html`: a self-contained page (no network), escaped, rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from typer.testing import CliRunner

import runner
from runner.app.export import schema
from runner.cli import html_report
from runner.cli.main import app
from runner.ledger import RunView

cli = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page(HTMLParser):
    """Collects what a page could fetch, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.fetches: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in {"src", "href", "srcset", "action", "data", "poster", "background"}:
                self.fetches.append(f"{tag}[{name}]={value}")

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data
        else:
            self.text.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def demo_report(tmp_path: Path) -> tuple[str, Path]:
    ledger = runner.Ledger()
    result = anyio.run(runner.run_simulated, "jobs/demo.jsonl", "1.00", ledger)
    path = tmp_path / "report.html"
    outcome = cli.invoke(app, ["report", result.run_id, "--html", str(path)])
    assert outcome.exit_code == 0, outcome.output
    assert f"HTML report written to {path}" in outcome.output
    return result.run_id, path


def test_html_report_is_self_contained_with_tables_and_three_charts(tmp_path: Path) -> None:
    run_id, path = demo_report(tmp_path)
    text = path.read_text(encoding="utf-8")
    page = parse(text)
    assert page.fetches == []  # no src, href, srcset...: nothing to fetch
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert "url(" not in page.style and "@import" not in page.style
    assert "http://" not in text and "https://" not in text
    assert page.tags.count("svg") == 3  # cost by model, latency distribution, spend over time
    words = " ".join(page.text)
    for model in ("openai/gpt-oss-120b", "zai-org/GLM-4.6", "moonshotai/Kimi-K2.5"):
        assert model in words
    assert f"Run {run_id}" in words
    assert "No errors." in words


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    base = dict.fromkeys(schema())
    return pl.DataFrame([{**base, **r} for r in rows], schema=schema(), orient="row")


def test_provider_and_job_text_is_escaped() -> None:
    start = datetime(2026, 11, 22, 1, 0, tzinfo=UTC)
    df = frame(
        [
            {
                "model": "m<b>x</b>",
                "status": "ok",
                "price_usd": Decimal("0.001"),
                "quote_usd": Decimal("0.002"),
                "latency_s": 0.5,
                "finished_at": start,
                "completion_tokens": 10,
            },
            {
                "model": "m<b>x</b>",
                "status": "ok",
                "price_usd": Decimal("0.003"),
                "latency_s": 0.7,
                "finished_at": start + timedelta(seconds=5),
            },
            {
                "model": "m<b>x</b>",
                "status": "failed",
                "error_type": "upstream",
                "error_message": "<script>alert(1)</script>",
                "finished_at": start + timedelta(seconds=5),
            },
        ]
    )
    run = view("r1", "/j/<img src=x>.jsonl", "done")
    text = html_report.render(run, df)
    page = parse(text)
    assert page.fetches == []
    assert "script" not in page.tags and "img" not in page.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "m&lt;b&gt;x&lt;/b&gt;" in text and "<b>x</b>" not in text
    assert "(+5 s)" in text  # the spend chart runs on the clock when the run lasted a second or more


def test_empty_run_renders() -> None:
    run = view("r0", "/j.jsonl", "stopped")
    text = html_report.render(run, pl.DataFrame())
    assert "No requests." in text and "Nothing charged." in text


def test_chromium_renders_the_page_without_any_request_of_its_own(tmp_path: Path) -> None:
    if CHROMIUM is None:  # CI installs it (.ci/run); elsewhere the test says what it needs
        needs = "Debian's chromium package (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: it needs {needs}")
        pytest.skip(f"needs {needs}")
    _, path = demo_report(tmp_path)
    shot, netlog = tmp_path / "report.png", tmp_path / "net.json"
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing could leave the machine anyway
        f"--log-net-log={netlog}",
        "--net-log-capture-mode=Everything",
        "--window-size=1250,1400",
        f"--screenshot={shot}",
        path.as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=90, check=True)
    assert shot.stat().st_size > 20_000  # a page with tables and charts, not a blank one
    log = json.loads(netlog.read_text())
    kinds = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    fetched = [
        event["params"]
        for event in log["events"]
        if kinds.get(event["type"]) == "URL_REQUEST_START_JOB" and "url" in event.get("params", {})
    ]
    # Chromium's own background calls have no origin; anything the page asked for would carry one
    from_page = [p["url"] for p in fetched if p.get("initiator") != "not an origin"]
    assert from_page == []


def view(run_id: str, job_path: str, state: str) -> RunView:
    return RunView(run_id, job_path, 1, "sim", state, None, 0, None, None, None, None, None, {}, 0)
