"""Sending from more than one process (`runner run --processes N`).

One Python process sends some thousands of requests a second at most: at that rate its own CPU, not
the provider, is the limit (a fast local endpoint, a cheap model). The helpers are started when the
command starts, so that their start-up runs beside the pre-flight, and wait for orders; the first
validates the job while the main process quotes it from the cache (no dry run is asked for, and
nothing is sent, before its verdict). Once the run is prepared and inside its budget, each is told
the run and its share of the concurrency and rate limits; the job's lines are handed out in chunks
as each process asks for more, so a slow starter takes fewer. Everything that keeps money safe stays
in the ledger, which all processes share: each request is reserved before it is sent (a row another
process reserved first is left to it), so the budget holds however many processes spend it.

The main process stays in charge: it prints the progress, decides when the run stops (a helper that
meets a budget limit or a fatal error tells it, and it tells the others), handles Ctrl-C, and runs
the recovery once every process has finished. A helper ignores Ctrl-C (the terminal sends it to the
whole process group; the main process relays it) and dies with the main process (a crash of the
main process is then a crash of the run, which resuming repairs as ever).

The wire between them: one socket pair per helper, one JSON object per line.
  main → helper: {"go": …} once, {"chunk": n | null} answering {"more": 1}, {"stop": reason},
                 {"abort": reason}; end of file before "go" means "not needed".
  helper → main: {"verdict": summary | null} first, unasked, from the helper started to validate
                 the job (`runner.helper`); {"more": 1}, {"fin": [[state, price_nanos], …]},
                 {"retry": [[attempt, wait_s, error], …]}, {"stop": [state, reason]}, then
                 {"end": {"aborted": bool}} or {"error": message, "kind": exception class} as
                 the last word.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from runner import codec, http
from runner.connect import ProviderSettings, connect
from runner.errors import ConfigError, JobChanged, JobError, LedgerError, RunnerError
from runner.events import Event, RequestFinished, Retrying
from runner.helper import RELAYED, VALIDATE_ONLY
from runner.jobs import JobSummary

if TYPE_CHECKING:
    from runner.engine import Engine, RunOptions

FLUSH_S = 0.05  # how often a helper reports the requests it finished
FLUSH_EVERY = 500  # … or as soon as this many have gathered
LINE_LIMIT = 1 << 24  # the longest message line read (asyncio's default, 64 KiB, is too short)


class Helper:
    """The main process's end of one helper process."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc, self.sock = proc, sock
        self.started = False  # told to go
        self.lost = False  # its end closed before it was told to go (it died starting up)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def open(self) -> None:
        if self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(sock=self.sock, limit=LINE_LIMIT)

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message; dropped once the helper is gone (it has no more use for it)."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(codec.dumps(message) + b"\n")

    def close_stream(self) -> None:
        if self._writer is not None:
            self._writer.close()

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None once the helper's end is closed (it finished or died)."""
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except (ConnectionError, ValueError):
            return None
        return codec.loads(line) if line else None


async def validation(helper: Helper) -> JobSummary | None:
    """The verdict of a helper spawned to validate the job (run while this process quotes it); None
    when it could not give one (this process then validates the job itself)."""
    try:
        await helper.open()
    except OSError:
        helper.lost = True
        return None
    message = await helper.receive()
    if message is None:
        helper.lost = True
        helper.close_stream()
        return None
    try:
        return JobSummary.from_json(message["verdict"]) if message.get("verdict") else None
    except (KeyError, TypeError, ValueError):  # not a summary: validated here instead
        return None


def spawn(count: int, validate: Path | None = None) -> list[Helper]:
    """Start `count` helpers; they load the code, then wait for orders (or for the end of file). The
    first validates the job `validate` first, and says its verdict (`validation`)."""
    if count and os.name != "posix":
        msg = "--processes above 1 needs a POSIX system (Linux, macOS)"
        raise ConfigError(msg)
    return [_start([str(validate)] if validate is not None and n == 0 else []) for n in range(count)]


def spawn_validator(job: Path) -> Helper | None:
    """A helper that validates `job` while this process quotes it, says its verdict and ends: the
    pre-flight of a run sent by this process alone. None where there is no POSIX process model, or
    when it cannot be started (the job is then validated here, as before quoting)."""
    if os.name != "posix":
        return None
    try:
        return _start([str(job), VALIDATE_ONLY])
    except OSError:
        return None


def _start(job_args: list[str]) -> Helper:
    ours, theirs = socket.socketpair()
    code = "from runner.helper import main; main()"
    command = [sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid()), *job_args]
    try:
        # The terminal's Ctrl-C goes to the whole process group, and a helper that has not started far
        # enough to ignore it would die of it (with a traceback): it starts with the signals blocked
        # (a mask survives exec), ignores them, then unblocks them (runner.helper). Here they stay
        # pending for the few milliseconds the start takes, not lost.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    return Helper(proc, ours)


def close(helpers: list[Helper], wait_s: float = 10.0) -> None:
    """Let every helper go: one never told to go is killed (it did nothing); one that ran has said
    its last word, or is given `wait_s` to finish aborting before the end of file takes it down."""
    deadline = time.monotonic() + wait_s
    for helper in helpers:
        if helper.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.proc.wait(max(0.0, deadline - time.monotonic()))
        else:  # never given work (a refused run, a bad job): no need to wait for its start-up
            helper.proc.kill()
        helper.sock.close()
    for helper in helpers:
        try:
            helper.proc.wait(5)
        except subprocess.TimeoutExpired:
            helper.proc.kill()
            helper.proc.wait()


def rebuilt(kind: str, message: str) -> RunnerError | None:
    """A helper's own error, to raise in the main process (its exit code and message as one process
    would give); None for anything else (a defect), which stops the run with its message instead."""
    if kind in ("JobChanged", "JobError"):  # a line changed, or no longer parses, since validation
        return JobChanged(message)
    if kind == "LedgerError":
        return LedgerError(message)
    if kind == "ConfigError":
        return ConfigError(message)
    return None


def share(options: RunOptions, processes: int) -> list[RunOptions]:
    """Each process's part of the concurrency and rate limits (together they are the whole)."""
    base, extra = divmod(options.concurrency, processes)
    return [
        dataclasses.replace(
            options,
            concurrency=base + (k < extra),
            rpm=options.rpm / processes if options.rpm else None,
            tpm=options.tpm / processes if options.tpm else None,
            handle_signals=options.handle_signals and k == 0,
        )
        for k in range(processes)
    ]


def go_message(
    job: Path, db: str, reach: ProviderSettings, scope: str, plan: dict[str, Any], options: RunOptions
) -> dict[str, Any]:
    settings = dataclasses.asdict(reach)
    settings["price_file"] = str(reach.price_file) if reach.price_file else None
    return {
        "go": {
            "job": str(job),
            "db": db,
            "reach": settings,
            "scope": scope,
            "plan": plan,
            "options": {
                "concurrency": options.concurrency,
                "rpm": options.rpm,
                "tpm": options.tpm,
                "policy": dataclasses.asdict(options.policy),
            },
        }
    }


# ---- the helper's side --------------------------------------------------------------------------


class _Channel:
    """The helper's end: orders in, finished requests out (gathered, sent every FLUSH_S)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.engine: Engine | None = None
        self._fin: list[list[Any]] = []
        self._retry: list[list[Any]] = []
        self._chunk: asyncio.Future[int | None] | None = None

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(codec.dumps(message) + b"\n")

    def relay(self, event: Event) -> None:
        """The engine's events: finished requests and retries go to the main process, which shows
        them; notices are its own to give."""
        if isinstance(event, RequestFinished):
            self._fin.append([event.state, event.price_nanos])
        elif isinstance(event, Retrying):
            self._retry.append([event.attempt, event.wait_s, event.error[:300]])
        if len(self._fin) + len(self._retry) >= FLUSH_EVERY:
            self.flush()

    def report_stop(self, state: str, reason: str) -> None:
        self.flush()
        self.send({"stop": [state, reason]})

    def flush(self) -> None:
        if self._fin:
            self.send({"fin": self._fin})
            self._fin = []
        if self._retry:
            self.send({"retry": self._retry})
            self._retry = []

    async def flush_often(self) -> None:
        while True:
            await anyio.sleep(FLUSH_S)
            self.flush()

    async def next_chunk(self) -> int | None:
        self._chunk = asyncio.get_running_loop().create_future()
        self.send({"more": 1})
        return await self._chunk

    async def listen(self) -> None:
        """Orders from the main process. Its end closing mid-run means it died: so does this one,
        at once, as it would have in a crash of a single process."""
        while line := await self.reader.readline():
            message = codec.loads(line)
            engine = self.engine
            assert engine is not None
            if "chunk" in message and self._chunk is not None and not self._chunk.done():
                self._chunk.set_result(message["chunk"])
            elif "stop" in message:
                engine.report_stop = None  # the main process knows
                engine.stop("interrupted", message["stop"])
            elif "abort" in message:
                engine.report_stop = None
                engine.abort(message["abort"])
        os.kill(os.getpid(), signal.SIGKILL)


async def serve(sock: socket.socket, go: dict[str, Any]) -> None:
    """A helper's part of the run it was told (`go`), until it ends or the main process stops it."""
    from runner.engine import Engine, RunOptions, _Plan, _sole_runner_error  # noqa: PLC0415
    from runner.ledger import Ledger  # noqa: PLC0415

    reader, writer = await asyncio.open_connection(sock=sock, limit=LINE_LIMIT)
    channel = _Channel(reader, writer)
    try:
        reach = go["reach"]
        reach["price_file"] = Path(reach["price_file"]) if reach["price_file"] else None
        settings = ProviderSettings(**reach)
        given = go["options"]
        options = RunOptions(
            concurrency=given["concurrency"],
            rpm=given["rpm"],
            tpm=given["tpm"],
            policy=http.RetryPolicy(**given["policy"]),
        )
        ledger = Ledger(go["db"])
        plan = _Plan(**go["plan"])
        async with connect(settings) as conn:
            conn.scope = go["scope"]
            engine = Engine(conn, ledger, plan, options, channel.relay, chunks=channel.next_chunk)
            engine.report_stop = channel.report_stop
            channel.engine = engine
            try:
                async with anyio.create_task_group() as talk:
                    talk.start_soon(channel.listen)
                    talk.start_soon(channel.flush_often)
                    await engine.run(Path(go["job"]))
                    talk.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # the engine's and this group's, nested
                raise _sole_runner_error(group) or group from None
        channel.flush()
        channel.send({"end": {"aborted": engine.aborted}})
    except RunnerError as exc:  # the main process raises it again, as one process would
        channel.flush()
        text = f"{exc}: {exc.issues[0]}" if isinstance(exc, JobError) and exc.issues else str(exc)
        channel.send({"error": text, "kind": type(exc).__name__})
    except Exception as exc:  # a defect: said to the main process, which stops the run with it
        channel.flush()
        channel.send({"error": f"a sending process failed: {type(exc).__name__}: {exc}"})
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()
