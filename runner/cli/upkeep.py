"""`runner ledger …`: looking after the ledger itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from runner.cli.app import app
from runner.cli.console import friendly, out
from runner.cli.options import DbOpt
from runner.core.errors import ConfigError
from runner.ledger import Ledger

ledger_app = typer.Typer(help="The ledger itself: backups and checks.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("backup")
@friendly
def backup(
    path: Annotated[Path, typer.Argument(help="Where the copy goes (a new file).")],
    db: DbOpt = None,
) -> None:
    """A consistent copy of the ledger, taken while runs may be writing to it (SQLite's online
    backup). Take one before upgrading runner, moving the ledger, or on a schedule."""
    if path.exists():
        msg = f"{path} exists: give a new file for the backup"
        raise ConfigError(msg)
    ledger = Ledger.for_reading(db)
    ledger.backup(str(path))
    out.print(f"the ledger {ledger.db.path} was copied to {path}", highlight=False)


@ledger_app.command("check")
@friendly
def check(db: DbOpt = None) -> None:
    """SQLite's quick integrity check of the ledger's file; exit 4 when it finds damage."""
    ledger = Ledger.for_reading(db)
    problem = ledger.damage()
    if problem is not None:
        out.print(
            f"the ledger {ledger.db.path} is damaged: {problem}; restore it from a backup", highlight=False
        )
        raise typer.Exit(4)
    out.print(f"the ledger {ledger.db.path}: no damage found", highlight=False)
