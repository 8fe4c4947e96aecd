"""End-to-end `runner run` against a fixed-reply loopback server, beside bare client loops, in one run.

    uv run python benchmarks/run.py [--requests 20000] [--concurrency 64] [--rounds 3]
                                    [--latency-requests 12800] [--rss-requests 1000000]

1. Throughput, zero latency: nginx (Debian's package; `apt-get install nginx-light`) answers every
   POST /v1/run with one fixed Run API reply, fast enough not to be the bottleneck; without nginx a
   small asyncio server in its own process stands in (and the output says so). Measured in the same
   run: a bare aiohttp loop (baseline), the same loop as a command of its own (its start-up and
   imports included, as they are in `runner run`'s wall clock), a bare httpx loop (default
   transport), and the real CLI
   `runner run` in its own process, quotes cached beforehand by `runner estimate`. For the runner two
   figures: the wall clock of the whole command (start-up, validation, ledger, export, report) and the
   sustained send rate the server saw from its first to its last call. A micro-benchmark: no user's
   API answers at once (benchmarks/latency.py measures the real workload). The machine's speed
   drifts from minute to minute, so --rounds rounds are run interleaved (baseline, the loop as a
   command, each runner) and medians reported, with each round's own ratios.
2. Latency-bound: the same reply after 200 ms (a bare asyncio server in its own process), concurrency
   256; the ceiling is 256 / 0.2 = 1,280 req/s. A bare aiohttp loop against it is the baseline.
3. Peak RSS of `runner run` (the whole process, from wait4) for a job of --rss-requests lines
   (0 skips it; a million lines take several minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

REPLY = json.dumps(
    {
        "success": True,
        "price": "0.000012345",
        "requestId": "req_bench",
        "data": {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": "openai/gpt-oss-120b",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x" * 120}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        },
    }
)
ENVELOPE = {
    "api": "baseten",
    "path": "/v1/chat/completions",
    "body": {
        "model": "openai/gpt-oss-120b",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}],
    },
}


# ---- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fixed_server(port: int, latency: float) -> None:
    """A fixed Run API reply after `latency` seconds; GET /stats gives the calls it saw and when.

    A bare asyncio protocol (no framework): at 1,280 delayed replies a second an aiohttp server spent
    enough of the shared CPU to hold a bare aiohttp client loop to 91 % of the ceiling.
    """
    reply = _http_reply(REPLY.encode())
    stamps: list[float] = []

    class Handler(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while True:
                head_end = self.buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                head = self.buffer[:head_end].decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                end = head_end + 4 + length
                if len(self.buffer) < end:
                    return
                self.buffer = self.buffer[end:]
                self.answer(head.split(" ", 2)[1])

        def answer(self, path: str) -> None:
            loop = asyncio.get_running_loop()
            if path == "/stats":
                found = {"calls": len(stamps), "first": stamps[0], "last": stamps[-1]}
                self.transport.write(_http_reply(json.dumps(found).encode()))
            elif path == "/reset":
                stamps.clear()
                self.transport.write(_http_reply(b"{}"))
            elif path == "/v1/credits/balance":  # what a run records as it begins and ends: not a call
                self.transport.write(_http_reply(b'{"balance": "1000000"}'))
            else:
                stamps.append(time.time())
                if latency:
                    loop.call_later(latency, self.transport.write, reply)
                else:
                    self.transport.write(reply)

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Handler, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def _http_reply(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class Server:
    def __init__(self, folder: Path, latency: float, *, nginx: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.nginx = nginx
        self.log = folder / "access.log"
        if nginx:
            conf = folder / "nginx.conf"
            conf.write_text(NGINX_CONF.format(port=self.port, folder=folder, reply=REPLY.replace("'", "\\'")))
            command = ["nginx", "-c", str(conf), "-p", str(folder), "-e", str(folder / "error.log")]
        else:
            code = f"from benchmarks.run import fixed_server; fixed_server({self.port}, {latency})"
            command = [sys.executable, "-c", code]
        self.proc = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        msg = "the benchmark server did not start"
        raise RuntimeError(msg)

    def reset(self) -> None:
        if self.nginx:
            time.sleep(0.3)  # the log is written every 100 ms: the last case's lines land first
            self.log.write_text("")
            self.proc.send_signal(signal.SIGUSR1)  # reopen the log
            time.sleep(0.2)
        else:
            httpx.post(f"{self.url}/reset")

    def sustained(self) -> tuple[int, float]:
        """Calls since the last reset, and their rate from the first call to the last."""
        if self.nginx:
            stamps = [float(line.split()[0]) for line in self.log.read_text().splitlines() if line]
            calls, first, last = len(stamps), min(stamps), max(stamps)
        else:
            found = httpx.get(f"{self.url}/stats").json()
            calls, first, last = found["calls"], found["first"], found["last"]
        return calls, calls / max(1e-9, last - first)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {folder}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    log_format stamp '$msec';
    access_log {folder}/access.log stamp buffer=256k flush=100ms;
    client_body_temp_path {folder};
    proxy_temp_path {folder};
    fastcgi_temp_path {folder};
    uwsgi_temp_path {folder};
    scgi_temp_path {folder};
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{reply}';
        }}
        location /v1/credits/balance {{
            access_log off;  # the balance a run records as it begins and ends: not a call
            default_type application/json;
            return 200 '{{"balance": "1000000"}}';
        }}
    }}
}}
"""


# ---- clients ------------------------------------------------------------------------------------


async def drive(send: Any, total: int, concurrency: int) -> float:
    remaining = iter(range(total))

    async def worker() -> None:
        for _ in remaining:
            await send()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start)


async def bare_aiohttp(url: str, total: int, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:

        async def send() -> None:
            async with session.post("/v1/run", json=ENVELOPE) as response:
                await response.json()

        return await drive(send, total, concurrency)


BARE_AIOHTTP_SCRIPT = """
import asyncio, sys, aiohttp
url, total, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = {envelope!r}
async def main():
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:
        remaining = iter(range(total))
        async def worker():
            for _ in remaining:
                async with session.post("/v1/run", json=body) as response:
                    await response.json()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
asyncio.run(main())
"""


def bare_aiohttp_process(url: str, total: int, concurrency: int) -> float:
    """The same loop as a command of its own, timed like `runner run`: start-up and imports included."""
    script = BARE_AIOHTTP_SCRIPT.format(envelope=ENVELOPE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as runner() does
    args = [sys.executable, "-c", script, url, str(total), str(concurrency)]
    subprocess.run([*args[:3], url, "1", "1"], check=True, env=env)  # byte code cached, not timed
    start = time.perf_counter()
    subprocess.run(args, check=True, env=env)
    return total / (time.perf_counter() - start)


async def bare_httpx(url: str, total: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:

        async def send() -> None:
            (await client.post("/v1/run", json=ENVELOPE)).json()

        return await drive(send, total, concurrency)


def write_job(path: Path, n: int) -> None:
    with path.open("w") as handle:
        for i in range(n):
            body = {
                "custom_id": f"b{i}",
                "model": "openai/gpt-oss-120b",
                "max_tokens": 20,
                "messages": [{"role": "user", "content": f"benchmark question {i}"}],
            }
            handle.write(json.dumps(body) + "\n")


def runner(folder: Path, server: Server, job: Path, command: str, *extra: str) -> tuple[float, int]:
    """Run a runner command in its own process: (wall seconds, peak RSS in KiB)."""
    env = {**os.environ, "RUNNER_DB": f"sqlite:///{folder}/ledger.db", "ORTHOGONAL_API_KEY": "bench"}
    # as on a user's machine, byte code is cached after the first command (the untimed `estimate`)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    args = [sys.executable, "-m", "runner", command, str(job), "--provider", "orthogonal"]
    args += ["--base-url", server.url, *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        msg = f"runner {command} exited {proc.returncode}"
        raise RuntimeError(msg)
    return time.perf_counter() - start, usage.ru_maxrss  # KiB on Linux


def megabytes(kib: int) -> str:
    return f"{kib * 1024 / 1e6:8,.1f} MB ({kib / 1024:,.1f} MiB)"


def run_case(folder: Path, server: Server, n: int, concurrency: int, name: str) -> tuple[float, float, int]:
    """`runner estimate` (quotes cached, not timed), then the timed `runner run` (a fresh run)."""
    job = folder / f"{name}.jsonl"
    if not job.exists():
        write_job(job, n)
        runner(folder, server, job, "estimate", "--concurrency", str(min(concurrency, 64)))
    server.reset()
    # a fresh run that sends every line: the rounds and cases share a ledger, whose answers would
    # otherwise be reused (the cache) instead of sent; `refresh` still looks for identical lines
    out = ["--output", str(folder / f"{name}.parquet"), "--new", "--cache", "refresh"]
    options = ["--max-usd", "1000", "--concurrency", str(concurrency), *out]
    wall, rss = runner(folder, server, job, "run", *options)
    calls, sustained = server.sustained()
    assert calls == n, f"the server saw {calls} calls, expected {n}"
    return n / wall, sustained, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-requests", type=int, default=12_800)
    parser.add_argument("--rss-requests", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    args = parser.parse_args()
    n, c = args.requests, args.concurrency
    use_nginx = shutil.which("nginx") is not None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = Server(folder, 0.0, nginx=use_nginx)
        try:
            kind = "nginx" if use_nginx else "asyncio stand-in (nginx not installed)"
            print(f"1. zero latency, {n:,} requests, concurrency {c}, server: {kind}", flush=True)
            plain = asyncio.run(bare_httpx(server.url, n, c))  # slow, and far behind: timed once
            got: dict[str, list[float]] = {"base": [], "alone": [], "whole": [], "sent": []}
            rss = 0
            for turn in range(1, args.rounds + 1):  # interleaved: the machine's drift hits every figure
                got["base"].append(asyncio.run(bare_aiohttp(server.url, n, c)))
                got["alone"].append(bare_aiohttp_process(server.url, n, c))
                wall, sustained, peak = run_case(folder, server, n, c, "zero")
                got["whole"].append(wall)
                got["sent"].append(sustained)
                rss = max(rss, peak)
                now = got["base"][-1]
                print(
                    f"   round {turn}: bare aiohttp {now:,.0f} req/s; runner run whole: {wall / now:.2f} x",
                    flush=True,
                )
            mid = {key: statistics.median(values) for key, values in got.items()}
            base, alone = mid["base"], mid["alone"]
            print(f"   medians of {args.rounds} rounds:")
            print(f"   bare aiohttp loop (baseline)      {base:8,.0f} req/s")
            print(f"   bare httpx loop (one round)       {plain:8,.0f} req/s  {plain / base:.2f} x")
            print(
                f"   bare aiohttp loop as a command    {alone:8,.0f} req/s  {alone / base:.2f} x"
                " (its own process: start-up included)"
            )
            whole, sent = mid["whole"], mid["sent"]
            print(
                f"   {'runner run, whole command':<33} {whole:8,.0f} req/s  {whole / base:.2f} x"
                f" ({whole / alone:.2f} x the loop as a command)"
            )
            print(f"   {'runner run, sustained send rate':<33} {sent:8,.0f} req/s  {sent / base:.2f} x")
            print(f"   runner run peak RSS               {megabytes(rss)}", flush=True)

            if args.rss_requests:
                print(f"3. peak RSS, {args.rss_requests:,} requests", flush=True)
                wall, sustained, rss = run_case(folder, server, args.rss_requests, c, "big")
                print(f"   runner run                        {wall:8,.0f} req/s whole, {sustained:,.0f} sent")
                print(f"   peak RSS                          {megabytes(rss)} (target <= 250 MB)", flush=True)
        finally:
            server.close()
        if not args.latency_requests:
            return
        slow = Server(folder, 0.2, nginx=False)
        try:
            m = args.latency_requests
            print(f"2. 200 ms latency, {m:,} requests, concurrency 256 (ceiling 1,280 req/s)", flush=True)
            slow.reset()
            asyncio.run(bare_aiohttp(slow.url, m, 256))
            _, bare = slow.sustained()
            print(f"   bare aiohttp loop, sustained      {bare:8,.0f} req/s  {bare / 1280:.1%}", flush=True)
            wall, sustained, _ = run_case(folder, slow, m, 256, "slow")
            print(f"   runner run, sustained send rate   {sustained:8,.0f} req/s  {sustained / 1280:.1%}")
            print(f"   runner run, whole command         {wall:8,.0f} req/s  {wall / 1280:.1%}")
        finally:
            slow.close()


if __name__ == "__main__":
    main()
