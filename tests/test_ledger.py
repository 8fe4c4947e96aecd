"""The ledger: migrations, the reservation invariants (property-based), and several processes."""

from __future__ import annotations

import multiprocessing
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlmodel import SQLModel
from typer.testing import CliRunner

from runner.cli.main import app
from runner.core.errors import BudgetLimitTooLow, ConfigError
from runner.ledger import Ledger, Settlement
from runner.ledger.db import PRAGMAS, sqlite_path
from runner.ledger.migrate import head_revision, migration_engine, migrations_dir
from tests.conftest import GOOD_BODY

cli = CliRunner()


def url(tmp_path: Path, name: str = "l.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def add_request(ledger: Ledger, budget_id: int, run_id: str, n: int) -> list[int]:
    if not ledger.runs() or run_id not in {r.id for r in ledger.runs()}:
        ledger.create_run(run_id, f"/jobs/{run_id}.jsonl", budget_id, "test")
    rows = [
        {
            "run_id": run_id,
            "custom_id": f"{run_id}-{i}",
            "line": i + 1,
            "model": "m",
            "sha256": "x",
            "state": "pending",
            "quote_nanos": 0,
            "reserved_nanos": 0,
            "attempts": 0,
            "quote_exact": True,
        }
        for i in range(n)
    ]
    ledger.add_requests(rows)
    with ledger.reading() as c:
        return [r[0] for r in c.execute("SELECT id FROM requests WHERE run_id = ? ORDER BY line", (run_id,))]


def test_blank_database_goes_to_head_with_the_expected_columns(tmp_path: Path) -> None:
    Ledger(url(tmp_path))
    db = sqlite3.connect(tmp_path / "l.db")
    version = db.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    assert version == "0011"
    indexes = {row[1] for row in db.execute("PRAGMA index_list(requests)")}
    assert {"ix_requests_run_state", "ix_requests_run_line", "ix_requests_answer_key"} <= indexes
    columns = {row[1] for row in db.execute("PRAGMA table_info(budgets)")}
    assert {"limit_nanos", "spent_nanos", "reserved_nanos", "possibly_billed_nanos"} <= columns
    columns = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
    assert {
        "state",
        "quote_nanos",
        "price_nanos",
        "response_json",
        "sha256",
        "answer_key",
        "cached_from",
        "worker_id",
    } <= columns
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"workers", "run_limits"} <= tables
    types = {row[1]: row[2] for row in db.execute("PRAGMA table_info(ledger_entries)")}
    assert types["amount_nanos"] == "BIGINT"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_autogenerate_finds_no_difference(tmp_path: Path) -> None:
    ledger = Ledger(url(tmp_path))
    engine = migration_engine(ledger.url, PRAGMAS)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    engine.dispose()
    assert diff == []


def test_the_head_revision_is_read_from_the_file_names_as_alembic_finds_it(tmp_path: Path) -> None:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    assert head_revision() == ScriptDirectory.from_config(config).get_current_head()
    ledger = Ledger(url(tmp_path))
    assert ledger.revision() == head_revision()


def test_a_database_of_the_previous_revision_is_upgraded(tmp_path: Path) -> None:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url(tmp_path))
    command.upgrade(config, "0001")
    db = sqlite3.connect(tmp_path / "l.db")
    db.execute(
        "INSERT INTO budgets (name, limit_nanos, spent_nanos, reserved_nanos, possibly_billed_nanos,"
        " ephemeral, created_at) VALUES ('old', 5, 0, 0, 0, 0, '2026-01-01')"
    )
    db.commit()
    assert "quotes" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    ledger = Ledger(url(tmp_path))
    assert ledger.budget("old").limit_nanos == 5
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert {"quotes", "ix_requests_run_line"} <= names


class Books(RuleBasedStateMachine):
    """Any sequence of reserve / settle / release / possibly_billed, grouped into transactions of any
    size (as the Writer groups them), keeps the books exact and never passes the limit."""

    limit = 1_000_000
    template: tuple[Path, list[int]] | None = None  # a migrated ledger with the budget and 40 requests

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp())
        if Books.template is None:
            folder = Path(tempfile.mkdtemp())
            ledger = Ledger(url(folder))
            budget = ledger.create_budget("b", self.limit)
            Books.template = (folder / "l.db", add_request(ledger, budget.id, "run", 40))
            ledger.close()
        shutil.copy(Books.template[0], self.tmp / "l.db")
        self.ledger = Ledger(url(self.tmp))
        self.budget = self.ledger.budget("b")
        self.open: dict[int, int] = {}
        self.free = list(Books.template[1])
        self.spent = self.possibly = 0
        self.batch: list[Callable[[Any], bool | None]] = []  # ops of the transaction not yet committed
        self.expected: list[bool | None] = []

    @initialize()
    def start(self) -> None:
        pass

    def _queue(self, op: Callable[[Any], bool | None], expected: bool | None = None) -> None:
        self.batch.append(op)
        self.expected.append(expected)

    @rule(amount=st.integers(0, 700_000))
    def reserve(self, amount: int) -> None:
        if not self.free:
            return
        request = self.free.pop()
        fits = self.spent + sum(self.open.values()) + self.possibly + amount <= self.limit
        self._queue(lambda db: self.ledger.reserve(db, self.budget.id, "run", request, amount), fits)
        if fits:
            self.open[request] = amount

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        if not self.open:
            return
        request = data.draw(st.sampled_from(sorted(self.open)))
        price = data.draw(st.integers(0, self.open.pop(request)))
        self._queue(lambda db: self.ledger.settle(db, Settlement(request, price, {})))
        self.spent += price

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.open:
            request = data.draw(st.sampled_from(sorted(self.open)))
            self.open.pop(request)
            self._queue(lambda db: self.ledger.release(db, request, state="failed", fields={}))

    @rule(data=st.data())
    def possibly_billed(self, data: st.DataObject) -> None:
        if self.open:
            request = data.draw(st.sampled_from(sorted(self.open)))
            self.possibly += self.open.pop(request)
            self._queue(lambda db: self.ledger.mark_possibly_billed(db, request, {}))

    @rule()
    def commit(self) -> None:
        with self.ledger.transaction() as db:
            results = [op(db) for op in self.batch]
        assert results == self.expected
        self.batch, self.expected = [], []

    @invariant()
    def books_balance(self) -> None:
        if self.batch:
            return  # the books are checked between transactions
        view = self.ledger.budget("b")
        assert view.spent_nanos + view.reserved_nanos + view.possibly_billed_nanos <= view.limit_nanos
        assert view.spent_nanos == self.spent
        assert view.reserved_nanos == sum(self.open.values())
        assert view.possibly_billed_nanos == self.possibly
        with self.ledger.reading() as c:
            entries = dict(
                c.execute(
                    "SELECT kind, COALESCE(SUM(amount_nanos), 0) FROM ledger_entries GROUP BY kind"
                ).fetchall()
            )
        assert entries.get("settle", 0) == self.spent
        # every reserved nano ends as exactly one of: settled, released, possibly billed, still open
        assert entries.get("reserve", 0) == (
            entries.get("settle", 0)
            + entries.get("release", 0)
            + entries.get("possibly_billed", 0)
            + view.reserved_nanos
        )

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


TestBooks = Books.TestCase
TestBooks.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def _hammer(db_url: str, run_id: str, seconds: float, out: Any) -> None:
    ledger = Ledger(db_url)
    budget = ledger.budget("shared")
    ids = add_request(ledger, budget.id, run_id, 4000)
    granted, charged = 0, 0
    deadline = time.monotonic() + seconds
    rng = random.Random(run_id)
    for request in ids:
        if time.monotonic() > deadline:
            break
        amount = rng.randint(1, 5_000)
        with ledger.transaction() as db:
            ok = ledger.reserve(db, budget.id, run_id, request, amount)
        if ok:
            granted += 1
            price = rng.randint(0, amount)
            with ledger.transaction() as db:
                ledger.settle(db, Settlement(request, price, {}))
            charged += price
    out.put((granted, charged))


def test_four_processes_never_exceed_one_budget(tmp_path: Path) -> None:
    db_url = url(tmp_path)
    Ledger(db_url).create_budget("shared", 2_000_000)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(db_url, f"p{i}", 3.0, queue)) for i in range(4)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    view = Ledger(db_url).budget("shared")
    assert sum(c for _, c in results) == view.spent_nanos
    assert view.spent_nanos <= view.limit_nanos
    assert view.reserved_nanos == 0
    with sqlite3.connect(tmp_path / "l.db") as db:
        settled = db.execute("SELECT COUNT(*) FROM requests WHERE state = 'ok'").fetchone()[0]
    assert settled == sum(g for g, _ in results) > 0


def test_budget_commands(tmp_path: Path) -> None:
    db = ["--db", url(tmp_path)]
    assert cli.invoke(app, ["budget", "create", "eval", "--limit", "25.00", *db]).exit_code == 0
    result = cli.invoke(app, ["budget", "raise", "eval", "--by", "10", *db])
    assert result.exit_code == 0 and "$35.0000" in result.output
    result = cli.invoke(app, ["budget", "show", "eval", *db])
    assert "$35.0000" in result.output
    result = cli.invoke(app, ["budget", "history", "eval", *db])
    assert "raise" in result.output and "create" in result.output
    result = cli.invoke(app, ["budget", "show", "nope", *db])
    assert result.exit_code == 1 and "no budget named 'nope'" in result.output
    result = cli.invoke(app, ["budget", "create", "x", "--limit", "lots", *db])
    assert result.exit_code == 2 and "not an amount" in result.output


def test_a_budget_cannot_go_below_spent_and_reserved(tmp_path: Path) -> None:
    ledger = Ledger(url(tmp_path))
    budget = ledger.create_budget("b", 1000)
    [request] = add_request(ledger, budget.id, "r", 1)
    with ledger.transaction() as db:
        assert ledger.reserve(db, budget.id, "r", request, 600)
    with pytest.raises(BudgetLimitTooLow):
        ledger.set_limit("b", 500)
    assert ledger.set_limit("b", 600).limit_nanos == 600


# ---- run owners ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "path"),
    [
        ("sqlite:///ledger.db", "ledger.db"),  # relative to the working folder
        ("sqlite:////var/lib/runner/ledger.db", "/var/lib/runner/ledger.db"),
    ],
)
def test_a_sqlite_url_names_its_file(given: str, path: str) -> None:
    assert sqlite_path(given) == path


@pytest.mark.parametrize("options", ["mode=ro", "mode=rw", "cache=shared"])
def test_sqlite_options_in_a_ledger_url_are_refused_not_ignored(tmp_path: Path, options: str) -> None:
    given = f"sqlite:///{tmp_path / 'l.db'}?{options}"
    result = cli.invoke(app, ["runs", "--db", given])
    assert result.exit_code == 2, result.output
    assert f"gives SQLite options ('?{options}')" in result.output
    assert not (tmp_path / "l.db").exists()  # mode=ro once wrote the file


@pytest.mark.parametrize(
    "given", ["postgresql://user:hunter2@db/runner", "sqlite://", "sqlite:///:memory:", "ledger.db"]
)
def test_a_ledger_url_that_is_not_a_sqlite_file_is_a_usage_error_that_shows_no_secret(given: str) -> None:
    with pytest.raises(ConfigError, match=r"must be a SQLite file") as caught:
        sqlite_path(given)
    assert "hunter2" not in str(caught.value)
    result = cli.invoke(app, ["budget", "list", "--db", given])
    assert result.exit_code == 2 and "hunter2" not in result.output


def test_commands_on_a_migrated_ledger_do_not_load_sqlalchemy(tmp_path: Path) -> None:
    """SQLAlchemy and alembic take a third of a second to load: only a migration needs them."""
    Ledger(url(tmp_path))  # migrated here
    code = (
        "import sys; from runner.cli.main import app; from runner.ledger import Ledger;"
        f" ledger = Ledger({url(tmp_path)!r}); ledger.create_budget('b', 5); ledger.budget('b');"
        " print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'sqlmodel', 'alembic')))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
    fresh = code.replace(url(tmp_path), url(tmp_path, "blank.db"))
    migrated = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, check=True)
    assert "sqlalchemy" in migrated.stdout and "alembic" in migrated.stdout  # a blank one is migrated


def test_a_ledger_that_cannot_be_opened_is_named_with_the_reason(tmp_path: Path) -> None:
    """A URL naming no folder is a usage error (exit 2); a file that is no ledger, or one whose pages
    are overwritten, is a damaged ledger: exit 4, the file named, what to do said, the file kept."""
    (tmp_path / "notes.txt").write_text("not a ledger\n" * 100)
    missing = tmp_path / "no" / "such" / "l.db"
    result = cli.invoke(app, ["budget", "list", "--db", f"sqlite:///{missing}"])
    assert result.exit_code == 2, result.output
    assert f"the ledger {missing} cannot be opened (unable to open" in result.output
    damaged = tmp_path / "damaged.db"
    Ledger(f"sqlite:///{damaged}").create_budget("b", 5)
    with damaged.open("r+b") as handle:  # the header and first pages overwritten
        handle.write(b"\x5a" * 4096)
    job = tmp_path / "job.jsonl"
    job.write_text('{"model": "openai/gpt-oss-120b", "messages": [{"role": "user", "content": "hi"}]}\n')
    run = ["run", str(job), "--provider", "simulator", "--max-usd", "1"]
    for path in (tmp_path / "notes.txt", damaged):
        for words in (["budget", "list"], ["runs"], run):
            result = cli.invoke(app, [*words, "--db", f"sqlite:///{path}"])
            assert result.exit_code == 4, (words, result.output)
            assert f"the ledger {path} cannot be used (file is not a database)" in result.output
            assert "the file is damaged (it is left as it is): restore it from a backup" in result.output
            assert "Traceback" not in result.output
    assert (tmp_path / "notes.txt").read_text() == "not a ledger\n" * 100


def test_the_sql_run_at_run_time_names_only_what_the_sqlmodel_tables_declare(tmp_path: Path) -> None:
    """The tables are declared once (runner/ledger/tables.py); the plain SQL the ledger runs is
    prepared against a ledger migrated from them, so a column it names that they lack fails here."""
    from sqlmodel import SQLModel  # noqa: PLC0415 - the declared schema

    from runner.app import export  # noqa: PLC0415
    from runner.ledger import base, tables, tx, views  # noqa: PLC0415

    assert tables  # the module that declares the tables is loaded
    declared = {name: {c.name for c in table.columns} for name, table in SQLModel.metadata.tables.items()}
    assert set(views.RUN_COLUMNS.split(", ")) <= declared["runs"]
    assert set(base.BUDGET_COLUMNS.split(", ")) <= declared["budgets"]
    assert set(export.ledger_columns()) <= declared["requests"]
    assert set(views.RequestRow._fields) <= declared["requests"]
    Ledger(url(tmp_path))
    db = sqlite3.connect(tmp_path / "l.db")
    statements = [tx.RESERVE, tx.MOVE, tx.HOLD, base.IDS_IN_STATE]
    statements.append(f"SELECT {views.RUN_COLUMNS} FROM runs")
    statements.append(f"SELECT {', '.join(export.ledger_columns())} FROM requests")
    for sql in statements:
        db.execute(f"EXPLAIN {sql}", [None] * sql.count("?"))  # fails on a column the table lacks


def test_a_backup_is_a_whole_ledger_and_a_check_finds_pages_overwritten(tmp_path: Path) -> None:
    source = tmp_path / "l.db"
    ledger = Ledger(f"sqlite:///{source}")
    ledger.create_budget("team", 5_000)
    with ledger.transaction() as tx:  # enough rows for the table to span many pages
        tx.conn.executemany(
            "INSERT INTO quotes (key, amount_nanos, exact, source, reason, at) VALUES (?, 1, 1, 's', '', ?)",
            [(f"k{i:06d}" * 8, tx.now) for i in range(5_000)],
        )
    copy = tmp_path / "backup.db"
    done = cli.invoke(app, ["ledger", "backup", str(copy), "--db", f"sqlite:///{source}"])
    assert done.exit_code == 0, done.output
    assert Ledger(f"sqlite:///{copy}").budget("team").limit_nanos == 5_000
    again = cli.invoke(app, ["ledger", "backup", str(copy), "--db", f"sqlite:///{source}"])
    assert again.exit_code == 2 and "exists" in again.output  # a backup is never overwritten
    assert cli.invoke(app, ["ledger", "check", "--db", f"sqlite:///{source}"]).exit_code == 0
    ledger.close()
    size = source.stat().st_size
    with source.open("r+b") as handle:  # pages in the middle of the file, past the schema
        handle.seek(size // 2)
        handle.write(b"\x00\xff" * 8192)
    found = Ledger(f"sqlite:///{source}").damage()
    assert found is not None
    checked = cli.invoke(app, ["ledger", "check", "--db", f"sqlite:///{source}"])
    assert checked.exit_code == 4, checked.output
    assert "is damaged" in checked.output and "restore it from a backup" in checked.output


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], Path]]]:
    """A folder, and what gives a read-only view of it: where the tests run as root (root writes
    whatever a file's mode says) a bind mount of it remounted read-only (which files still open for
    writing elsewhere do not prevent); the folder itself, its and its files' modes taken away,
    otherwise."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    folder, view = tmp_path / "rw", tmp_path / "ro"
    folder.mkdir()
    view.mkdir()
    root = os.geteuid() == 0
    mounted = False

    def seal() -> Path:
        nonlocal mounted
        if not root:
            for path in folder.iterdir():
                path.chmod(0o444)
            folder.chmod(0o555)
            return folder
        bound = subprocess.run(["mount", "--bind", str(folder), str(view)], check=False)
        if bound.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail("CI must run the read-only ledger test: a bind mount failed")
            pytest.skip("needs to bind-mount a folder (root without the mount capability)")
        mounted = True
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        return view

    yield folder, seal
    if mounted:
        subprocess.run(["umount", "--lazy", str(view)], check=False)  # the ledger may hold it open
    if not root:
        folder.chmod(0o755)


def test_a_read_only_ledger_can_be_read_and_a_run_on_it_says_what_to_do(
    read_only_folder: tuple[Path, Callable[[], Path]], tmp_path: Path, write_job: Callable[..., Path]
) -> None:
    folder, seal = read_only_folder
    db = f"sqlite:///{folder / 'l.db'}"
    job = write_job([{"custom_id": f"c{i}", **GOOD_BODY} for i in range(3)])
    done = cli.invoke(app, ["run", str(job), "--provider", "simulator", "--max-usd", "1", "--db", db,
                            "-o", str(tmp_path / "first.parquet")])  # fmt: skip
    assert done.exit_code == 0, done.output
    run_id = Ledger(db).runs()[0].id
    sealed = seal()
    db = f"sqlite:///{sealed / 'l.db'}"
    for words in (
        ["runs"],
        ["status", run_id],
        ["report", run_id],
        ["export", run_id, "-o", str(tmp_path / "again.parquet")],
        ["budget", "list"],
        ["ledger", "check"],
    ):
        result = cli.invoke(app, [*words, "--db", db])
        assert result.exit_code == 0, (words, result.output)
    assert (tmp_path / "again.parquet").stat().st_size > 0
    refused = cli.invoke(
        app, ["run", str(job), "--provider", "simulator", "--max-usd", "1", "--new", "--db", db]
    )
    assert refused.exit_code == 4, refused.output
    assert f"the ledger {sealed / 'l.db'} cannot be used" in refused.output
    assert "Traceback" not in refused.output
