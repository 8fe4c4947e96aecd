"""The typer application the command modules register on, and what several commands share."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import polars as pl
import typer

from runner.core.errors import ConfigError
from runner.ledger import Ledger

app = typer.Typer(
    help="Cost-aware batch runner for LLM chat requests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def check_writable(path: Path) -> None:
    """A results path that cannot be written is a usage error, named before anything runs."""
    if path.is_dir():
        msg = f"--output: {path} is a folder; give a file path (e.g. {path / 'results.parquet'})"
        raise ConfigError(msg)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders still missing are made at the export
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        msg = f"--output: {path} cannot be written ({folder} is not a writable folder)"
        raise ConfigError(msg)


def export_to(writer: Callable[[Ledger, str, Path], int], ledger: Ledger, run_id: str, path: Path) -> int:
    """A run's results written by `writer`; a failed write says the results are kept in the ledger."""
    try:
        return writer(ledger, run_id, path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        msg = (
            f"cannot write {path}: {exc}; the run's results are kept in the ledger "
            f"(`runner export {run_id} -o PATH` writes them)"
        )
        raise ConfigError(msg) from None
