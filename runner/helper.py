"""A helper process of `runner run --processes N` (started by `fleet.spawn`): its entry point.

The first helper validates the job while the main process quotes it (the job is named on its
command line), and its verdict is wanted as soon as possible: it loads what validating needs, says
its verdict unasked, and only then loads the code that sends (the engine, the ledger), while the
main process is still quoting. Then, like every helper, it waits for its order to go. A helper
started only to validate (`fleet.spawn_validator`, for a run sent by one process) ends with its
verdict.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
import time
from typing import Any

PR_SET_PDEATHSIG = 1
ORDER_LIMIT = 1 << 20  # the longest first order read (a "go" is about a kilobyte)
RELAYED = {signal.SIGINT, signal.SIGTERM}  # what the terminal sends the group, relayed by the main process
VALIDATE_ONLY = "--validate-only"  # after the job on the command line: the verdict is all


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when the main process dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _next_order(sock: socket.socket) -> dict[str, Any] | None:
    """The next order line, read off the socket exactly (what follows it stays there for the event
    loop's reader); None at the end of file."""
    while True:
        try:
            waiting = sock.recv(ORDER_LIMIT, socket.MSG_PEEK)
        except OSError:
            return None
        if not waiting:
            return None
        end = waiting.find(b"\n")
        if end >= 0:
            order: dict[str, Any] = json.loads(sock.recv(end + 1))
            return order
        time.sleep(0.001)  # half a line has arrived: the rest follows at once


def _verdict(job: str) -> dict[str, Any] | None:
    """The job's validation summary as JSON; None when validating failed (a defect): the main
    process then validates the job itself and meets the failure as its own."""
    from runner.jobs import validate_job  # noqa: PLC0415 - what validating needs, and no more

    try:
        return validate_job(job).to_json()
    except Exception:  # a defect: met by the main process's own validation
        return None


def main() -> None:
    fd, parent, *job = sys.argv[1:]
    _die_with_parent(int(parent))
    for number in RELAYED:  # the main process relays them; started with them blocked (fleet._start)
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED)
    sock = socket.socket(fileno=int(fd))
    if job:  # the first thing wanted: said unasked
        with contextlib.suppress(OSError):  # the main process is gone: the order below says so
            sock.sendall(json.dumps({"verdict": _verdict(job[0])}).encode() + b"\n")
        if job[1:] == [VALIDATE_ONLY]:
            sock.close()
            os._exit(0)  # nothing to tear down that matters (see below)
    import anyio  # noqa: PLC0415 - the code that sends, loaded while the main process prepares the run

    from runner import engine, fleet, ledger  # noqa: PLC0415, F401 - all of it, before the order comes

    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    order = _next_order(sock)
    if order is None:
        return  # not needed this time
    anyio.run(fleet.serve, sock, order["go"])
    # Everything is committed and said (the main process waits for this process to end before it
    # writes the Parquet file): no need to take the libraries down one by one (polars' threads,
    # the ledger's connections), which took a tenth of a second.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
