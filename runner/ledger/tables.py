"""The ledger's tables (SQLModel). Money columns are integer nano-USD."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Float, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from runner.ledger.db import utcnow


def nanos(default: int | None = 0, *, nullable: bool = False) -> int:
    column = Column(BigInteger, nullable=nullable, default=default)
    result: int = Field(default=default, sa_column=column)
    return result


class Budget(SQLModel, table=True):
    __tablename__ = "budgets"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    limit_nanos: int = nanos()
    spent_nanos: int = nanos()
    reserved_nanos: int = nanos()
    possibly_billed_nanos: int = nanos()
    ephemeral: bool = False  # made for one run by --max-usd
    created_at: datetime = Field(default_factory=utcnow)


class Run(SQLModel, table=True):
    __tablename__ = "runs"

    id: str = Field(primary_key=True)
    job_path: str = Field(index=True)
    budget_id: int = Field(foreign_key="budgets.id")
    provider: str
    state: str = "running"  # preparing (rows being made, none sent) | running | interrupted | stopped | done
    reason: str | None = None
    total: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    owner: str | None = None  # "host:pid" of the process running it, cleared when it stops
    seen_at: datetime | None = None  # the owner's last sign of life
    # the provider's balance when the run began and when it ended (reconciliation by balance)
    balance_before_nanos: int | None = nanos(None, nullable=True)
    balance_after_nanos: int | None = nanos(None, nullable=True)
    # the next chunk of the job's lines a worker claims; set back to 0 when a session of the run starts
    next_chunk: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, default=0, server_default="0")
    )
    mode: str | None = None  # sync | batch: how the run buys its answers (None: sync, before batches)


class Request(SQLModel, table=True):
    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("run_id", "custom_id"),
        Index("ix_requests_run_state", "run_id", "state"),
        Index("ix_requests_run_line", "run_id", "line"),  # exports page through a run in line order
        Index("ix_requests_answer_key", "answer_key"),  # answers reused across runs and lines
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.id")
    custom_id: str
    line: int
    model: str
    sha256: str
    # pending | reserved | sending | ok | failed | possibly_billed | skipped | copy (its answer is
    # another row's: `cached_from`, or the run's first line with the same answer_key)
    state: str = "pending"
    answer_key: str | None = None  # the body's hash, with the line's sample mark when it has one
    cached_from: int | None = None  # the row whose answer this one reuses
    reconciled: str | None = None  # what the provider's books said: charged | not_charged
    quote_nanos: int | None = nanos(None, nullable=True)
    quote_exact: bool = False
    quote_source: str | None = None  # dry_run | price_table | tokenized (the prompt counted by the server)
    output_bound: int | None = None  # the most tokens the answer may have (max_tokens x choices)
    reserved_nanos: int = nanos()  # the current attempt's hold (a possibly billed one's, once marked)
    # earlier attempts' holds kept as possibly billed when the request was sent again
    possibly_billed_nanos: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, default=0, server_default="0")
    )
    price_nanos: int | None = nanos(None, nullable=True)
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    content: str | None = Field(default=None, sa_column=Column(Text))
    reasoning_content: str | None = Field(default=None, sa_column=Column(Text))
    tool_calls: str | None = Field(default=None, sa_column=Column(Text))
    finish_reason: str | None = None
    response_json: str | None = Field(default=None, sa_column=Column(Text))
    latency_s: float | None = None
    first_token_s: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error_type: str | None = None
    error_message: str | None = None
    metadata_json: str | None = Field(default=None, sa_column=Column(Text))
    worker_id: str | None = None  # the worker that claimed it, until it is finished or taken over
    batch_part: int | None = Field(default=None, index=True)  # the batch part it is in (state `batched`)
    mode: str | None = None  # how its answer was bought: sync | batch
    sync_price_nanos: int | None = nanos(None, nullable=True)  # its answer's price as a call


class BatchPart(SQLModel, table=True):
    """Lines of a run sent as one provider batch: recorded before and after each step (held,
    uploaded, submitted, settled), so that a process killed at any moment never makes a second batch
    of the same lines (the batch's metadata names the run and part; a resume looks for it)."""

    __tablename__ = "batch_parts"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.id", index=True)
    number: int  # 1, 2, ... within the run
    state: str = "held"  # held | uploaded | submitted | settled
    lines: int = 0
    bytes: int = nanos()
    digest: str  # sha256 of the input file
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the provider's word: validating | in_progress | completed | expired ...
    completed: int = 0  # the provider's counts
    failed: int = 0
    cancel: bool = False  # to be cancelled (the deadline, or the run switched to sync)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime | None = None


class Attempt(SQLModel, table=True):
    __tablename__ = "attempts"

    id: int | None = Field(default=None, primary_key=True)
    request_id: int = Field(foreign_key="requests.id", index=True)
    number: int
    outcome: str  # ok | retry | fatal | unknown
    status: int | None = None
    error: str | None = None
    latency_s: float | None = None
    at: datetime = Field(default_factory=utcnow)
    client_request_id: str | None = Field(default=None, index=True)  # sent as X-Client-Request-Id


class LedgerEntry(SQLModel, table=True):
    __tablename__ = "ledger_entries"

    id: int | None = Field(default=None, primary_key=True)
    budget_id: int = Field(foreign_key="budgets.id", index=True)
    run_id: str | None = None
    request_id: int | None = None
    # create | raise | reserve | settle | release | possibly_billed
    kind: str
    amount_nanos: int = nanos()
    at: datetime = Field(default_factory=utcnow)


class QuoteCache(SQLModel, table=True):
    """Quotes keyed by provider + model + request hash: asked once, reused by every later command."""

    __tablename__ = "quotes"

    key: str = Field(primary_key=True)
    amount_nanos: int | None = nanos(None, nullable=True)
    exact: bool = False
    source: str
    reason: str | None = None
    at: datetime = Field(default_factory=utcnow)


class Worker(SQLModel, table=True):
    """A process sending a run: several may send one run, each claiming chunks of its lines."""

    __tablename__ = "workers"

    id: str = Field(primary_key=True)  # "host:pid:tag"
    run_id: str = Field(foreign_key="runs.id", index=True)
    host: str
    pid: int
    state: str = "running"  # running | left (it finished) | gone (its sign of life lapsed: taken over)
    started_at: datetime = Field(default_factory=utcnow)
    seen_at: datetime | None = None  # its last sign of life
    finished_at: datetime | None = None
    sent: int = 0  # requests it sent
    ok: int = 0
    failed: int = 0
    slots: int = 0  # its share of the run's --concurrency


class RunLimit(SQLModel, table=True):
    """A rate limit kept for a whole run (--rpm, --tpm, --max-usd-per-hour): a token bucket whose
    level is whole units (requests, tokens, nano-USD); `stamp` is the ledger clock's time (epoch
    seconds) up to which the level is counted."""

    __tablename__ = "run_limits"

    run_id: str = Field(foreign_key="runs.id", primary_key=True)
    name: str = Field(primary_key=True)
    level: int = nanos()
    stamp: float = Field(sa_column=Column(Float, nullable=False))
