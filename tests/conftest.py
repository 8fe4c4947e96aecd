from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from runner.providers import http
from runner.simulator import Books, SimulatorThread
from tests.postgres import PostgresServer

GOOD_BODY: dict[str, Any] = {
    "model": "openai/gpt-oss-120b",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 32,
}


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own ledger and no real credentials."""
    monkeypatch.setenv("RUNNER_DB", f"sqlite:///{tmp_path / 'ledger.db'}")
    for name in ("ORTHOGONAL_API_KEY", "OPENAI_API_KEY", "ORTHOGONAL_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    # the machine's proxies and certificate settings stay out of loopback tests (tests set their own)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def write_job(tmp_path: Path) -> Callable[..., Path]:
    """Write a job file from objects (dumped as JSON) or raw bytes/str lines."""

    def write(lines: list[Any], name: str = "job.jsonl") -> Path:
        path = tmp_path / name
        with path.open("wb") as handle:
            for line in lines:
                if isinstance(line, bytes):
                    handle.write(line)
                elif isinstance(line, str):
                    handle.write(line.encode())
                else:
                    handle.write(json.dumps(line).encode() + b"\n")
        return path

    return write


@pytest.fixture(autouse=True)
def _no_backoff() -> Iterator[None]:
    """Retries keep their logic but wait zero seconds in tests."""
    http.set_testing(True)
    yield
    http.set_testing(False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Serve small aiohttp apps on loopback for the test; each call gives the app's base URL."""
    servers: list[TestServer] = []

    async def serve(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield serve
    for server in servers:
        await server.close()


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    """The real simulator on an ephemeral loopback port."""
    with SimulatorThread(Books(retry_after_s=0.05, stall_s=5.0)) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (tests make a database each)."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh ledger on each backend: a SQLite file, or a new database on the session's server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def sim_process() -> Iterator[Callable[[str], Any]]:
    """`runner simulator` in processes of their own (tests.test_processes.SimProcess), closed after."""
    from tests.test_processes import SimProcess  # noqa: PLC0415 - the process tests' helper

    started: list[SimProcess] = []

    def start(latency: str = "0.05-0.15") -> SimProcess:
        started.append(SimProcess(latency))
        return started[-1]

    yield start
    for sim in started:
        sim.close()
