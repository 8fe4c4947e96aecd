"""Which way a run buys its answers: calls (`sync`), the provider's Batch API at its batch prices
(`batch`), or `auto`, and why."""

from __future__ import annotations

import dataclasses
import time

from runner.core.catalog import ModelInfo
from runner.core.config import RunConfig
from runner.core.errors import ConfigError, printable
from runner.core.jobs import JobSummary
from runner.ledger import Ledger
from runner.providers.batch import COMPLETION_WINDOW_S, BatchQuoted
from runner.providers.connection import Connection


def recorded_mode(ledger: Ledger, config: RunConfig, job_key: str, scope: str) -> str | None:
    """The mode of the run this command goes on with, if it goes on with one."""
    if config.run_id is not None:
        return ledger.run(config.run_id).mode
    if config.new:
        return None
    latest = ledger.latest_run(job_key, scope)
    return None if latest is None else ledger.run(latest).mode


def choose_mode(
    config: RunConfig, conn: Connection, summary: JobSummary, recorded: str | None
) -> tuple[str, str | None]:
    """(sync | batch, why when it was chosen for the user): `--mode`, else the run's own, else sync.
    `batch` where the provider has no Batch API, or a model no batch price, is a usage error."""
    asked = config.mode or recorded or "sync"
    if asked == "sync":
        return "sync", None
    provider = conn.scope.split(":", 1)[0]
    if conn.batches is None:
        if asked == "batch":
            msg = (
                f"--mode batch: the {provider} provider has no Batch API (the Run API answers calls "
                "only); use --mode sync, or an OpenAI-compatible endpoint with --provider openai"
            )
            raise ConfigError(msg)
        return "sync", f"--mode auto: sync (the {provider} provider has no Batch API)"
    missing = sorted(m for m in summary.per_model if not conn.batches.offers(m))
    if missing:
        if asked == "batch":
            msg = (
                f"--mode batch: no batch price is known for '{printable(missing[0])}': give it "
                "batch_input and batch_output (or batch_discount) in the price file"
            )
            raise ConfigError(msg)
        return "sync", f"--mode auto: sync (no batch price for '{printable(missing[0])}')"
    if asked == "batch":
        return "batch", None
    if config.deadline is not None and config.deadline - time.time() < COMPLETION_WINDOW_S:
        why = "the deadline is closer than the Batch API's 24 h completion window"
        return "sync", f"--mode auto: sync ({why})"
    why = "no deadline" if config.deadline is None else "the deadline is 24 h or more away"
    return "batch", f"--mode auto: batch ({why}, and the provider sells these models in batches)"


def quoting(conn: Connection, mode: str) -> Connection:
    """The connection the pre-flight quotes through: at batch prices for a batch run."""
    if mode != "batch" or conn.batches is None:
        return conn
    return dataclasses.replace(conn, provider=BatchQuoted(conn.provider, conn.batches))


def quoted_prices(conn: Connection, table: dict[str, ModelInfo]) -> dict[str, ModelInfo]:
    """The prices the connection's quotes are made at: the batch prices for a batch run's."""
    if not isinstance(conn.provider, BatchQuoted) or conn.batches is None:
        return table
    client = conn.batches  # its batch prices (the simulator's, or the price file's)
    found = {slug: client.batch_info(slug) for slug in {*table, *client.prices}}
    return {slug: info for slug, info in found.items() if info is not None}
