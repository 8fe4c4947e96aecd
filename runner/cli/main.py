"""The `runner` command: the typer application with every command module registered on it."""

from __future__ import annotations

from runner.cli import budget, jobs, runs, upkeep  # noqa: F401 - each registers its commands
from runner.cli.app import app
from runner.cli.console import tune_collector


def main() -> None:
    tune_collector()
    app()


__all__ = ["app", "main"]
