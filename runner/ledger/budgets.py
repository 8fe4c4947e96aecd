"""Budgets: a limit, and what is spent, reserved and possibly billed against it."""

from __future__ import annotations

from typing import Any

from runner.core.errors import (
    BudgetLimitTooLow,
    BudgetNotFound,
    LedgerError,
)
from runner.core.money import format_usd
from runner.ledger.base import (
    BUDGET_COLUMNS,
    LedgerBase,
)
from runner.ledger.db import Connection, rows_as_dicts
from runner.ledger.views import BudgetView


class BudgetOps(LedgerBase):
    def create_budget(self, name: str, limit_nanos: int, *, ephemeral: bool = False) -> BudgetView:
        if limit_nanos < 0:
            msg = "a budget's limit cannot be negative"
            raise LedgerError(msg)
        with self.transaction() as tx:
            conn = tx.conn
            if conn.execute("SELECT id FROM budgets WHERE name = ?", (name,)).fetchone():
                msg = f"budget '{name}' already exists (use `runner budget raise`)"
                raise LedgerError(msg)
            (budget_id,) = conn.execute(
                "INSERT INTO budgets (name, limit_nanos, spent_nanos, reserved_nanos, possibly_billed_nanos,"
                " ephemeral, created_at) VALUES (?, ?, 0, 0, 0, ?, ?) RETURNING id",
                (name, limit_nanos, ephemeral, tx.now),
            ).fetchone()
            tx.budget_entry(int(budget_id), "create", limit_nanos)
        return self.budget(name)

    def budget(self, name: str, conn: Connection | None = None) -> BudgetView:
        query = f"SELECT {BUDGET_COLUMNS} FROM budgets WHERE name = ?"  # noqa: S608 - our names
        if conn is not None:
            row = conn.execute(query, (name,)).fetchone()
        else:
            with self.db.reading() as c:
                row = c.execute(query, (name,)).fetchone()
        if row is None:
            msg = f"no budget named '{name}' (create it with `runner budget create {name} --limit USD`)"
            raise BudgetNotFound(msg, budget=name)
        return BudgetView(*row)

    def budget_by_id(self, budget_id: int) -> BudgetView:
        with self.db.reading() as c:
            row = c.execute(f"SELECT {BUDGET_COLUMNS} FROM budgets WHERE id = ?", (budget_id,)).fetchone()  # noqa: S608
        if row is None:
            msg = f"no budget with id {budget_id}"
            raise LedgerError(msg)
        return BudgetView(*row)

    def budget_ephemeral(self, budget_id: int) -> bool:
        """Whether the budget was made by --max-usd for one run (not a named, shared one)."""
        with self.db.reading() as c:
            row = c.execute("SELECT ephemeral FROM budgets WHERE id = ?", (budget_id,)).fetchone()
        return bool(row and row[0])

    def budgets(self, *, include_ephemeral: bool = False) -> list[BudgetView]:
        where = "" if include_ephemeral else " WHERE NOT ephemeral"
        with self.db.reading() as c:
            rows = c.execute(f"SELECT {BUDGET_COLUMNS} FROM budgets{where} ORDER BY name").fetchall()  # noqa: S608
        return [BudgetView(*row) for row in rows]

    def set_limit(self, name: str, limit_nanos: int) -> BudgetView:
        with self.transaction() as tx:
            conn = tx.conn
            current = self.budget(name, conn)
            committed = current.spent_nanos + current.reserved_nanos + current.possibly_billed_nanos
            if limit_nanos < committed:
                msg = f"budget '{name}' cannot go below what is spent and reserved ({format_usd(committed)})"
                raise BudgetLimitTooLow(msg)
            conn.execute("UPDATE budgets SET limit_nanos = ? WHERE id = ?", (limit_nanos, current.id))
            tx.budget_entry(current.id, "raise", limit_nanos - current.limit_nanos)
        return self.budget(name)

    def history(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        budget = self.budget(name)
        query = "SELECT * FROM ledger_entries WHERE budget_id = ? ORDER BY id DESC LIMIT ?"
        with self.db.reading() as c:
            return rows_as_dicts(c.execute(query, (budget.id, limit)), times=("at",))
