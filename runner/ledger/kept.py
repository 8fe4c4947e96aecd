"""Answers the provider charged for whose settlement could not be committed (a full disk, a ledger
made read-only): never dropped. The engine keeps them in memory and tries again once the run ends;
what still cannot be written goes to a recovery file beside the ledger (or in the temporary folder
when that cannot be written either), which the next worker to take up the run applies before it
recovers anything else, so the answers reach the ledger and the Parquet and nothing is paid twice."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runner.ledger.holds import HoldOps
from runner.ledger.tx import Hold
from runner.ledger.views import Settlement


@dataclass(frozen=True)
class KeptAnswer:
    """A settlement, with its attempt, as the engine made it."""

    settlement: Settlement
    attempt: int
    latency_s: float | None


class KeptOps(HoldOps):
    def settle_kept(self, answers: list[KeptAnswer]) -> None:
        """Write kept answers in one transaction: each request that is still unsettled (sending, or
        marked possibly billed by a recovery since) becomes the charge with its answer."""
        with self.transaction() as tx:
            for kept in answers:
                s = kept.settlement
                if tx.state(s.request_id) not in ("sending", "possibly_billed"):
                    continue  # settled meanwhile (an earlier try that did commit)
                self.record_attempt(tx, s.request_id, kept.attempt, "ok", None, kept.latency_s)
                self.settle(tx, s)

    def keep_answers(self, run_id: str, answers: list[KeptAnswer]) -> Path:
        """Write kept answers to the run's recovery file (beside the ledger, else in the temporary
        folder); where it is. Raises OSError when neither can be written."""
        lines = "".join(json.dumps(_as_json(kept), ensure_ascii=False) + "\n" for kept in answers)
        last: OSError | None = None
        for path in self._kept_paths(run_id):
            staging = path.with_name(f"{path.name}.part")
            try:
                with staging.open("w", encoding="utf-8") as handle:
                    handle.write(lines)
                    handle.flush()
                    os.fsync(handle.fileno())
                staging.replace(path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    staging.unlink()
                last = exc
                continue
            return path
        assert last is not None
        raise last

    def apply_kept_answers(self, run_id: str) -> int:
        """Settle the answers a run's recovery files keep, then remove the files; how many."""
        applied = 0
        for path in self._kept_paths(run_id):
            if not path.exists():
                continue
            answers = [_from_json(json.loads(line)) for line in path.read_text("utf-8").splitlines() if line]
            self.settle_kept(answers)
            path.unlink()
            applied += len(answers)
        return applied

    def _kept_paths(self, run_id: str) -> list[Path]:
        name = f"runner-unsaved-answers-{run_id}.jsonl"
        beside = Path(self.db.path).parent if self.db.dialect == "sqlite" else None
        folders = [beside] if beside is not None else []
        return [folder / name for folder in [*folders, Path(tempfile.gettempdir())]]


def _as_json(kept: KeptAnswer) -> dict[str, object]:
    s = kept.settlement
    hold = None if s.hold is None else [s.hold.amount, s.hold.budget_id, s.hold.run_id]
    return {
        "request_id": s.request_id,
        "price_nanos": s.price_nanos,
        "fields": s.fields,
        "hold": hold,
        "attempt": kept.attempt,
        "latency_s": kept.latency_s,
    }


def _from_json(data: dict[str, object]) -> KeptAnswer:
    hold = data["hold"]
    held = Hold(int(hold[0]), int(hold[1]), str(hold[2])) if isinstance(hold, list) else None
    fields = data["fields"]
    assert isinstance(fields, dict)
    settlement = Settlement(int(str(data["request_id"])), int(str(data["price_nanos"])), fields, held)
    latency = data["latency_s"]
    seconds = float(str(latency)) if latency is not None else None
    return KeptAnswer(settlement, int(str(data["attempt"])), seconds)
