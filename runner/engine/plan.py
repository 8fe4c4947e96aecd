"""What the pre-flight hands the run phase: the run this worker sends and its share of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.core.errors import JobChanged
from runner.core.models import ChatRequest

CHUNK_LINES = 500  # the job's lines are claimed and read in chunks of this many


@dataclass
class Plan:
    run_id: str
    budget_id: int
    resumed: bool
    owner: str  # this worker's id (ledger.workers.worker_name)
    chunk_lines: int = CHUNK_LINES
    alone: bool = True  # no other worker was sending the run when this one joined
    slots: int = 1  # this worker's share of the run's concurrency, to begin with


def changed(job: Path, request: ChatRequest, run_id: str, what: str) -> JobChanged:
    """The error for a job line that is not what the run's row was made from."""
    msg = (
        f"{job}:{request.line}: custom_id '{request.custom_id}' {what} since run {run_id} began; "
        "restore the line, or start a fresh run with --new"
    )
    return JobChanged(msg)
