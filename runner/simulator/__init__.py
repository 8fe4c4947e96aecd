"""A loopback HTTP server speaking the Run API and the OpenAI-compatible API, with fake answers,
real prices, its own charge ledger and faults on demand."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from runner.simulator.app import make_app
from runner.simulator.books import Books, parse_latency

__all__ = ["Books", "SimulatorThread", "parse_latency", "serve"]


@asynccontextmanager
async def serve(
    books: Books, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Serve in the running event loop (over TLS with `ssl_context`); yields the base URL (an
    ephemeral port by default)."""
    runner = web.AppRunner(make_app(books), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, ssl_context=ssl_context)
    await site.start()
    server = site._server
    assert server is not None
    sockets: Any = getattr(server, "sockets", None)
    bound = sockets[0].getsockname()[1]
    try:
        yield f"{'https' if ssl_context else 'http'}://{host}:{bound}"
    finally:
        await runner.cleanup()


class SimulatorThread:
    """The simulator on its own event loop in a background thread (for tests and sync callers)."""

    def __init__(self, books: Books | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.books = books or Books()
        self.ssl_context = ssl_context
        self.base_url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="simulator", daemon=True)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self.books, ssl_context=self.ssl_context) as url:
            self.base_url = url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        if not self._ready.wait(10):
            msg = "the simulator did not start"
            raise RuntimeError(msg)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
