"""SIGKILL at the moments of a batch run where a crash would lose a batch or pay for it twice (before
the upload, between making a batch and recording its id, while polling, halfway through settling),
then the same command again: no batch made twice, every line charged once, the books equal the
ledger. The runner runs as a real process (killed by its own hand at the moment named), the simulator
in another."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from runner.ledger import Ledger
from tests.test_batch_mode import MODEL, lines
from tests.test_processes import KEY, SimProcess

# Runs runner's CLI with one step patched to kill the process (SIGKILL: nothing is cleaned up) at the
# moment CRASH_AT names.
DRIVER = """
import os, signal, sys
from runner.cli.main import main
from runner.ledger import Ledger
from runner.providers.batch import BatchClient

def die():
    os.kill(os.getpid(), signal.SIGKILL)

moment = os.environ["CRASH_AT"]
if moment == "before_upload":
    async def upload(self, content, name):
        die()
    BatchClient.upload = upload
elif moment == "after_create":  # the batch is made at the provider, its id not yet recorded
    recorded = Ledger.update_part
    def update_part(self, part_id, **values):
        if values.get("state") == "submitted":
            die()
        return recorded(self, part_id, **values)
    Ledger.update_part = update_part
elif moment == "while_polling":
    looked = BatchClient.retrieve
    seen = []
    async def retrieve(self, batch_id):
        seen.append(batch_id)
        if len(seen) == 3:
            die()
        return await looked(self, batch_id)
    BatchClient.retrieve = retrieve
elif moment == "while_settling":  # the first chunk of lines settled and committed, the rest not
    settled = Ledger.settle_lines
    def settle_lines(self, *args):
        settled(self, *args)
        die()
    Ledger.settle_lines = settle_lines
sys.argv = ["runner", *sys.argv[1:]]
main()
"""


def _env(db: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "RUNNER_DB": db, "OPENAI_API_KEY": KEY, "COLUMNS": "200", **extra}


def _args(sim: SimProcess, job: Path, prices: Path) -> list[str]:
    return [
        "run",
        str(job),
        "--provider",
        "openai",
        "--base-url",
        f"{sim.url}/v1",
        "--price-file",
        str(prices),
        "--mode",
        "batch",
        "--batch-size",
        "20",
        "--max-usd",
        "1",
        "-o",
        str(job.with_suffix(".parquet")),
    ]


@pytest.mark.parametrize("moment", ["before_upload", "after_create", "while_polling", "while_settling"])
def test_a_batch_run_killed_at_any_step_resumes_without_a_second_batch_or_charge(
    moment: str, tmp_path: Path, sim_process: Any, write_job: Any
) -> None:
    sim: SimProcess = sim_process("0")
    sim.http.post("/_sim/config", json={"batch_duration": 0.5})
    job = write_job(lines(60))
    prices = tmp_path / "prices.toml"
    prices.write_text(f'["{MODEL}"]\ninput = 0.10\noutput = 0.50\nbatch_discount = 0.5\n')
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    driver = [sys.executable, "-c", DRIVER, *_args(sim, job, prices)]
    killed = subprocess.run(
        driver, env=_env(db, CRASH_AT=moment), capture_output=True, text=True, timeout=120, check=False
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr

    again = [sys.executable, "-m", "runner", *_args(sim, job, prices)]
    done = subprocess.run(again, env=_env(db), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    ledger = Ledger(db)
    run = ledger.runs()[0]
    assert run.states == {"ok": 60}
    parts = ledger.parts(run.id)
    assert len(parts) == 3 and all(p.state == "settled" for p in parts)
    stats = sim.stats()
    assert stats["batches_created"] == 3  # never a second batch of the same lines
    charges = Counter(t["customId"] for t in sim.transactions())
    assert sorted(charges) == sorted(f"b{i}" for i in range(60)) and set(charges.values()) == {1}
    assert stats["charged_nanos"] == run.spent_nanos == ledger.budget_by_id(run.budget_id).spent_nanos
    if moment == "after_create":
        assert "was made before the process stopped" in done.stderr + done.stdout


def test_ctrl_c_leaves_the_batches_running_and_the_same_command_collects_them(
    tmp_path: Path, sim_process: Any, write_job: Any
) -> None:
    sim: SimProcess = sim_process("0")
    sim.http.post("/_sim/config", json={"batch_duration": 3})
    job = write_job(lines(40))
    prices = tmp_path / "prices.toml"
    prices.write_text(f'["{MODEL}"]\ninput = 0.10\noutput = 0.50\nbatch_discount = 0.5\n')
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    command = [sys.executable, "-m", "runner", *_args(sim, job, prices)]
    proc = subprocess.Popen(
        command, env=_env(db), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 30
    while sim.stats()["batches_created"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 4, output
    assert "keep running at the provider" in output and "--run" in output
    assert sim.charges() == 0  # nothing delivered yet, nothing cancelled: the batches run on
    done = subprocess.run(command, env=_env(db), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sim.stats()["batches_created"] == 2 and sim.charges() == 40
    assert Ledger(db).runs()[0].states == {"ok": 40}
