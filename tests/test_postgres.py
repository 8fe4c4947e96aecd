"""The ledger on PostgreSQL: the same store, migrations and guarantees as on SQLite, and credentials
that never show."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from runner.cli.main import app
from runner.core.money import to_nanos
from runner.ledger import Ledger
from tests.conftest import SimulatorThread
from tests.postgres import PostgresServer

cli = CliRunner()
DEMO = Path(__file__).resolve().parents[1] / "jobs" / "demo.jsonl"


def test_a_blank_database_is_migrated_and_autogenerate_finds_no_difference(postgres: PostgresServer) -> None:
    from alembic.autogenerate import compare_metadata  # noqa: PLC0415
    from alembic.migration import MigrationContext  # noqa: PLC0415
    from sqlmodel import SQLModel  # noqa: PLC0415

    ledger = Ledger(postgres.new_database())
    assert ledger.revision() == "0011"
    engine = ledger.db.migration_engine()
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    engine.dispose()


def test_the_demo_runs_on_postgresql_and_a_rerun_pays_nothing(
    postgres: PostgresServer, sim: SimulatorThread, tmp_path: Path
) -> None:
    url = postgres.new_database()
    env = {"ORTHOGONAL_API_KEY": "k", "RUNNER_DB": url, "COLUMNS": "200"}
    command = ["run", str(DEMO), "--provider", "orthogonal", "--base-url", sim.base_url, "--max-usd", "1"]
    first = cli.invoke(app, [*command, "-o", str(tmp_path / "a.parquet")], env=env)
    assert first.exit_code == 0, first.output
    assert postgres.password not in first.output
    ledger = Ledger(url)
    run = ledger.runs()[0]
    assert run.states == {"ok": 22} and run.spent_nanos == sim.books.charged_nanos
    frame = pl.read_parquet(tmp_path / "a.parquet")
    assert frame.height == 22 and frame["started_at"].null_count() == 0
    again = cli.invoke(app, [*command, "--new", "-o", str(tmp_path / "b.parquet")], env=env)
    assert again.exit_code == 0, again.output
    assert sim.books.stats()["counters"]["run.call"] == 22  # answered from the ledger
    status = cli.invoke(app, ["status", run.id, "--json"], env=env)
    assert json.loads(status.stdout)["states"] == {"ok": 22}
    agree = cli.invoke(app, ["reconcile", run.id], env=env)
    assert agree.exit_code == 0 and "+0 nano-USD" in agree.output


def test_reservations_never_pass_the_limit_across_connections(postgres: PostgresServer) -> None:
    """Many threads reserving from one budget through their own ledger objects: the limit holds."""
    import threading  # noqa: PLC0415

    url = postgres.new_database()
    first = Ledger(url)
    first.create_budget("team", to_nanos(Decimal("0.000100")))  # 100 reservations of 1,000 nano-USD
    first.create_run("r", "job", first.budget("team").id, "test")
    first.add_requests(
        [
            {
                "run_id": "r",
                "custom_id": f"c{i}",
                "line": i,
                "model": "m",
                "sha256": "x",
                "state": "pending",
                "quote_nanos": 1000,
                "quote_exact": True,
                "reserved_nanos": 0,
                "attempts": 0,
            }
            for i in range(300)
        ]
    )
    with first.reading() as c:
        ids = [row[0] for row in c.execute("SELECT id FROM requests ORDER BY id")]
    granted: list[bool] = []

    def worker(share: list[int]) -> None:
        ledger = Ledger(url)
        for row_id in share:
            with ledger.transaction() as tx:
                granted.append(ledger.reserve(tx, first.budget("team").id, "r", row_id, 1000))
        ledger.close()

    threads = [threading.Thread(target=worker, args=(ids[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    view = first.budget("team")
    assert granted.count(True) == 100 and view.reserved_nanos == view.limit_nanos


def test_credentials_never_show(postgres: PostgresServer, tmp_path: Path) -> None:
    wrong = postgres.url(password="not-the-password-42")
    result = cli.invoke(app, ["budget", "list"], env={"RUNNER_DB": wrong})
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "not-the-password-42" not in result.output and "cannot be" in result.output
    assert f"postgresql://runner@127.0.0.1:{postgres.port}/postgres" in result.output
    good = postgres.new_database()
    ok = cli.invoke(app, ["budget", "create", "x", "--limit", "1"], env={"RUNNER_DB": good})
    assert ok.exit_code == 0 and postgres.password not in ok.output
    down = cli.invoke(app, ["runs"], env={"RUNNER_DB": good.replace(str(postgres.port), "1")})
    assert down.exit_code != 0 and postgres.password not in down.output and "Traceback" not in down.output
