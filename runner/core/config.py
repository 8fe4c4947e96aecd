"""A run's configuration: everything a run is given, declared once, built and checked once, passed
whole (CLI → run → pre-flight → engine).

Each field that a command takes as a flag says so in its metadata (`flag(...)`): the flag, its help,
the commands that take it and how the flag's text becomes the field's value. The CLI builds its
options from these declarations (runner.cli.options), so a new run option is its field here, its
check in `__post_init__` and the code that uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from runner.core.errors import ConfigError
from runner.core.money import parse_usd

CACHE_MODES = ("reuse", "refresh", "off")
MODES = ("sync", "batch", "auto")  # how a run buys its answers: calls, a provider's Batch API, or chosen
MAX_LINE_BYTES = 16 * 1024 * 1024  # a job line longer than this is an error, not a memory spike
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # between two reads of a reply: a reasoning call can think quietly for minutes

# the commands that take run flags
RUN, RESUME, SWEEP, ESTIMATE = "run", "resume", "sweep", "estimate"
RECONCILE, BALANCE, VALIDATE = "reconcile", "balance", "validate"


@dataclass(frozen=True)
class Flag:
    """How a field is given on the command line."""

    names: tuple[str, ...]
    help: str
    commands: frozenset[str]
    cli_type: Any  # the type typer reads the flag as
    parse: Callable[[Any], Any] | None = None  # the flag's value → the field's


def flag(
    *names: str,
    help: str,
    commands: tuple[str, ...],
    cli_type: Any,
    default: Any = MISSING,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field given by `names` to `commands`."""
    meta = {"flag": Flag(names, help, frozenset(commands), cli_type, parse)}
    return field(default=default, metadata=meta)


def parse_duration_s(text: str | None) -> float | None:
    """'1s', '6m0s', '250ms', '2h30m' or a bare number of seconds; None when it is none of these."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            return None
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total


def parse_deadline(text: str, now: float | None = None) -> float:
    """--deadline: a duration (90s, 45m, 2h30m, or seconds), a time of day (06:30, the next one) or
    a date and time (2026-12-03T06:30); returns a time.time() instant."""
    now = time.time() if now is None else now
    seconds = parse_duration_s(text.strip())
    if seconds is not None:
        return now + seconds
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            clock = datetime.strptime(text.strip(), "%H:%M").time()  # noqa: DTZ007 - local time, as typed
        except ValueError:
            msg = f"--deadline: '{text}' is not a duration (2h30m), a time (06:30) or a date and time"
            raise ConfigError(msg) from None
        today = datetime.fromtimestamp(now).astimezone()
        moment = datetime.combine(today.date(), clock, tzinfo=today.tzinfo)
        if moment.timestamp() <= now:
            moment += timedelta(days=1)
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as typed
    return moment.timestamp()


def usd_arg(what: str) -> Callable[[str | None], Decimal | None]:
    """A parser of a USD flag (`what` names it in the message)."""

    def parse(text: str | None) -> Decimal | None:
        if text is None:
            return None
        try:
            return parse_usd(text)
        except ValueError:
            msg = f"{what}: '{text}' is not an amount in USD (e.g. 25.00)"
            raise ConfigError(msg) from None

    return parse


def _deadline(text: str | None) -> float | None:
    return None if text is None else parse_deadline(text)


@dataclass(frozen=True)
class Timeouts:
    """Seconds: to connect (TCP and TLS), and between two reads of a reply."""

    connect_s: float = CONNECT_TIMEOUT_S
    read_s: float = READ_TIMEOUT_S


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter and a cap; Retry-After wins when the server gives one."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 300.0


_OPENERS = (RUN, SWEEP, ESTIMATE, BALANCE)  # the commands that name a provider (resume takes the run's)
_TALKERS = (RUN, RESUME, SWEEP, ESTIMATE)  # the commands that call one


@dataclass(frozen=True)
class ProviderSettings:
    """Which provider a run talks to, and how."""

    name: str = flag(
        "--provider",
        help="orthogonal | openai | simulator (in-process, offline).",
        commands=_OPENERS,
        cli_type=str,
        default="orthogonal",
    )
    base_url: str | None = flag(
        "--base-url", help="The provider's base URL.", commands=_OPENERS, cli_type=str | None, default=None
    )
    price_file: Path | None = flag(
        "--price-file",
        help="TOML/JSON prices per 1M tokens (openai), batch prices too.",
        commands=(RUN, RESUME, ESTIMATE, RECONCILE, SWEEP, VALIDATE),
        cli_type=Path | None,
        default=None,
    )
    sim_pricing: str = flag(
        "--sim-pricing",
        help="Simulator: tokens | flat.",
        commands=(RUN, SWEEP, ESTIMATE),
        cli_type=str,
        default="tokens",
    )
    read_timeout_s: float = flag(
        "--timeout",
        help="Seconds a reply may stay silent (a long reasoning call is quiet).",
        commands=(*_TALKERS, RECONCILE),
        cli_type=float,
        default=READ_TIMEOUT_S,
    )
    connect_timeout_s: float = flag(
        "--connect-timeout",
        help="Seconds to connect (TCP and TLS).",
        commands=(*_TALKERS, RECONCILE),
        cli_type=float,
        default=CONNECT_TIMEOUT_S,
    )
    api_key: str | None = None
    api: str | None = None  # the Run API's upstream (None: the provider's default)
    max_connections: int = 256  # the run's concurrency: no request waits for a connection
    sim_balance: str = "100"
    sim_latency: str = "0"
    sim_dry_run_latency: str = "0.05-0.2"  # the in-process simulator's dry runs take a round trip

    def __post_init__(self) -> None:
        given = (("--timeout", self.read_timeout_s), ("--connect-timeout", self.connect_timeout_s))
        for name, value in given:
            if not value > 0:  # NaN is not > 0 either
                msg = f"{name} must be above 0 seconds (got {value:g})"
                raise ConfigError(msg)

    @classmethod
    def from_flags(cls, **given: Any) -> ProviderSettings:
        """Provider settings from the command line's flags."""
        return cls(**_parsed(cls, given))

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(connect_s=self.connect_timeout_s, read_s=self.read_timeout_s)


_RUNNERS = (RUN, RESUME, SWEEP)  # the commands that send


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is given. `job` is the JSONL file sent (a sweep's is the job it expands to)."""

    job: Path = Path()
    provider: ProviderSettings = field(default_factory=ProviderSettings)
    budget: str | None = flag(
        "--budget", help="The budget to spend from.", commands=(RUN, SWEEP), cli_type=str | None, default=None
    )
    max_usd: Decimal | None = flag(
        "--max-usd",
        help="A cap of this run's own (USD).",
        commands=(RUN, SWEEP),
        cli_type=str | None,
        default=None,
        parse=usd_arg("--max-usd"),
    )
    concurrency: int = flag(
        "--concurrency", help="Requests in flight at most.", commands=_TALKERS, cli_type=int, default=64
    )
    rpm: float | None = flag(
        "--rpm", help="Requests per minute at most.", commands=_RUNNERS, cli_type=float | None, default=None
    )
    tpm: float | None = flag(
        "--tpm", help="Tokens per minute at most.", commands=_RUNNERS, cli_type=float | None, default=None
    )
    max_usd_per_hour: Decimal | None = flag(
        "--max-usd-per-hour",
        help="Spend (held quotes) per hour at most.",
        commands=_RUNNERS,
        cli_type=str | None,
        default=None,
        parse=usd_arg("--max-usd-per-hour"),
    )
    deadline: float | None = flag(  # a time.time() instant after which nothing more is launched
        "--deadline",
        help="Stop launching then (2h30m, 06:30, or a date and time); drain.",
        commands=_RUNNERS,
        cli_type=str | None,
        default=None,
        parse=_deadline,
    )
    partial: bool = flag(
        "--partial/--no-partial",
        help="Run what fits the budget, in file order.",
        commands=(RUN,),
        cli_type=bool,
        default=False,
    )
    new: bool = flag(
        "--new", help="Start a fresh run, do not resume.", commands=(RUN,), cli_type=bool, default=False
    )
    run_id: str | None = flag(  # go on with this run of the job instead of its newest
        "--run",
        help="Go on with this run of the job (any unfinished one).",
        commands=(RUN,),
        cli_type=str | None,
        default=None,
    )
    retry_possibly_billed: bool = flag(
        "--retry-possibly-billed",
        help="Re-send requests whose outcome is unknown.",
        commands=(RUN, RESUME),
        cli_type=bool,
        default=False,
    )
    retry_failed: bool = flag(  # failed requests of the run are sent again (new attempts)
        "--retry-failed",
        help="Send the run's failed requests again.",
        commands=(RUN, RESUME),
        cli_type=bool,
        default=False,
    )
    cache: str = flag(
        "--cache",
        help="reuse: answers kept in the ledger are not bought again; refresh: buy them again; "
        "off: send every line as written.",
        commands=_TALKERS,
        cli_type=str,
        default="reuse",
    )
    max_line_bytes: int = flag(
        "--max-line-bytes",
        help="The longest job line read (16 MiB by default).",
        commands=(RUN, RESUME, ESTIMATE, VALIDATE),
        cli_type=int,
        default=MAX_LINE_BYTES,
    )
    output: Path | None = flag(
        "--output", "-o", help="Parquet path.", commands=_RUNNERS, cli_type=Path | None, default=None
    )
    admit: str = flag(
        "--admit",
        help="bound: start when every request's bound fits the budget; expected: when the expected cost "
        "fits (each request still held at its bound, so the run stops cleanly, resumable, if the money "
        "runs out).",
        commands=_RUNNERS,
        cli_type=str,
        default="bound",
    )
    mode: str | None = flag(  # None: a run that exists keeps its own, a new one is sync
        "--mode",
        help="sync: calls; batch: the provider's Batch API at its batch prices; auto: batch when the "
        "deadline allows (default: the run's own mode, else sync).",
        commands=(*_RUNNERS, ESTIMATE),
        cli_type=str | None,
        default=None,
    )
    batch_size: int = flag(
        "--batch-size",
        help="Lines per provider batch at most (50,000, the Batch API's limit, by default).",
        commands=_RUNNERS,
        cli_type=int,
        default=50_000,
    )
    # batch mode: the seconds a call is taken to last when the ledger has none of this provider's to
    # go by (whether what is left still finishes by --deadline as calls), and between two looks at a
    # batch (the least, and the most as the wait grows)
    sync_latency_s: float | None = None
    batch_poll_s: tuple[float, float] = (1.0, 60.0)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    grace_s: float = flag(
        "--grace",
        help="After a first Ctrl-C, seconds the requests in flight get to finish (then aborted).",
        commands=_RUNNERS,
        cli_type=float,
        default=30.0,
    )
    handle_signals: bool = False  # Ctrl-C and SIGTERM drain the run (the CLI's runs)

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            msg = f"--cache must be one of {', '.join(CACHE_MODES)} (got '{self.cache}')"
            raise ConfigError(msg)
        if self.concurrency < 1:
            msg = f"--concurrency must be 1 or more (got {self.concurrency})"
            raise ConfigError(msg)
        for name, value in (("--rpm", self.rpm), ("--tpm", self.tpm)):
            if value is not None and not value > 0:  # NaN is not > 0 either
                msg = f"{name} must be above 0 (got {value:g}); leave it out for no limit"
                raise ConfigError(msg)
        if self.max_usd_per_hour is not None and not self.max_usd_per_hour > 0:
            msg = f"--max-usd-per-hour must be above 0 (got {self.max_usd_per_hour})"
            raise ConfigError(msg)
        if self.admit not in ("bound", "expected"):
            msg = f"--admit must be bound or expected (got '{self.admit}')"
            raise ConfigError(msg)
        if self.mode is not None and self.mode not in MODES:
            msg = f"--mode must be one of {', '.join(MODES)} (got '{self.mode}')"
            raise ConfigError(msg)
        if not 1 <= self.batch_size <= 50_000:
            msg = (
                f"--batch-size must be from 1 to 50,000 lines, the Batch API's limit (got {self.batch_size})"
            )
            raise ConfigError(msg)
        if self.max_line_bytes < 1:
            msg = f"--max-line-bytes must be 1 or more (got {self.max_line_bytes})"
            raise ConfigError(msg)
        if not self.grace_s >= 0:  # NaN is not >= 0 either
            msg = f"--grace cannot be negative (got {self.grace_s:g} s)"
            raise ConfigError(msg)
        if self.provider.max_connections != self.concurrency:  # no request waits for a connection
            object.__setattr__(self, "provider", replace(self.provider, max_connections=self.concurrency))

    def with_flags(self, **given: Any) -> RunConfig:
        """This configuration with flags applied (their values as typed): what `resume` does to the
        configuration the run was made with."""
        own = {f.name for f in fields(RunConfig)}
        mine = {k: v for k, v in given.items() if k in own}
        theirs = {k: v for k, v in given.items() if k not in own}
        provider = replace(self.provider, **_parsed(ProviderSettings, theirs)) if theirs else self.provider
        return replace(self, provider=provider, **_parsed(RunConfig, mine))

    @classmethod
    def from_flags(cls, job: Path, **given: Any) -> RunConfig:
        """A configuration from the command line's flags (their values as typed)."""
        return cls(job=job).with_flags(**given)


def _parsed(kind: type, given: dict[str, Any]) -> dict[str, Any]:
    """Flag values as typed → field values, through each field's parser."""
    out: dict[str, Any] = {}
    known = {f.name: f for f in fields(kind)}
    for name, value in given.items():
        if name not in known:
            msg = f"{kind.__name__} has no setting '{name}'"
            raise TypeError(msg)
        spec = known[name].metadata.get("flag")
        out[name] = spec.parse(value) if spec is not None and spec.parse is not None else value
    return out


def flags_of(command: str) -> list[tuple[str, Flag, Any]]:
    """The (name, flag, default) of every setting `command` takes as a flag, provider settings first."""
    found = []
    for kind in (ProviderSettings, RunConfig):
        for f in fields(kind):
            spec = f.metadata.get("flag")
            if spec is not None and command in spec.commands:
                found.append((f.name, spec, f.default))
    return found
