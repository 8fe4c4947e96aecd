"""`runner budget …`: budgets kept in the ledger."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import typer
from rich.table import Table

from runner.cli.app import app
from runner.cli.console import budget_table, friendly, out
from runner.cli.documents import budget_json, print_json, usd
from runner.cli.options import DbOpt, JsonOpt
from runner.core.config import usd_arg
from runner.core.errors import ConfigError
from runner.core.money import format_usd, to_nanos
from runner.ledger import Ledger


def _usd(text: str, what: str) -> Decimal:
    amount = usd_arg(what)(text)
    assert amount is not None
    return amount


budget_app = typer.Typer(help="Budgets kept in the ledger: a hard stop on spending.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")


@budget_app.command("create")
@friendly
def budget_create(
    name: str,
    limit: Annotated[str, typer.Option("--limit", help="USD, e.g. 25.00")],
    db: DbOpt = None,
) -> None:
    """Create a budget with a spending limit."""
    view = Ledger(db).create_budget(name, to_nanos(_usd(limit, "--limit")))
    out.print(budget_table([view], "budget created"))


@budget_app.command("list")
@friendly
def budget_list(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List the budgets."""
    views = Ledger.for_reading(db).budgets()
    if as_json:
        print_json([budget_json(v) for v in views])
        return
    out.print(budget_table(views, "budgets"))


@budget_app.command("show")
@friendly
def budget_show(name: str, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Limit, spent, reserved, possibly billed and remaining money of one budget."""
    view = Ledger.for_reading(db).budget(name)
    if as_json:
        print_json(budget_json(view))
        return
    out.print(budget_table([view], f"budget {name}"))


@budget_app.command("raise")
@friendly
def budget_raise(
    name: str,
    to: Annotated[str | None, typer.Option("--to", help="The new limit in USD.")] = None,
    by: Annotated[str | None, typer.Option("--by", help="USD to add to the limit.")] = None,
    db: DbOpt = None,
) -> None:
    """Change a budget's limit (never below what is already spent and reserved)."""
    if (to is None) == (by is None):
        msg = "give exactly one of --to or --by"
        raise ConfigError(msg)
    ledger = Ledger(db)
    current = ledger.budget(name)
    limit = (
        to_nanos(_usd(to, "--to"))
        if to is not None
        else current.limit_nanos + to_nanos(_usd(by or "0", "--by"))
    )
    out.print(budget_table([ledger.set_limit(name, limit)], f"budget {name}"))


@budget_app.command("history")
@friendly
def budget_history(name: str, db: DbOpt = None, limit: int = 50, as_json: JsonOpt = False) -> None:
    """A budget's ledger entries, newest first."""
    if as_json:
        entries = Ledger.for_reading(db).history(name, limit)
        keys = ("kind", "run_id", "request_id")
        print_json(
            [
                {**{k: e[k] for k in keys}, "at": e["at"].isoformat(), "amount_usd": usd(e["amount_nanos"])}
                for e in entries
            ]
        )
        return
    table = Table(title=f"history of {name}", title_justify="left")
    for column in ("when (UTC)", "entry", "amount", "run", "request"):
        table.add_column(column, no_wrap=True)
    for e in Ledger.for_reading(db).history(name, limit):
        table.add_row(
            e["at"].strftime("%Y-%m-%d %H:%M:%S"),
            e["kind"],
            format_usd(e["amount_nanos"], places=9),
            e["run_id"] or "",
            str(e["request_id"] or ""),
        )
    out.print(table)
