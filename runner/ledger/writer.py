"""Grouped commits for async code: many ledger writes, one transaction, run off the event loop.

A caller awaits `submit(op)` and gets the op's result only after the transaction holding it has
committed, so "granted" always means "durably granted".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runner.ledger.store import Ledger
from runner.ledger.tx import Tx

T = TypeVar("T")
MAX_BATCH = 512


@dataclass
class _Op(Generic[T]):
    apply: Callable[[Tx], T]
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None


class Writer:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._send: MemoryObjectSendStream[_Op[Any]]
        self._receive: MemoryObjectReceiveStream[_Op[Any]]
        self._send, self._receive = anyio.create_memory_object_stream[_Op[Any]](MAX_BATCH * 4)
        self.commits = 0

    async def submit(self, apply: Callable[[Tx], T]) -> T:
        op: _Op[T] = _Op(apply)
        try:
            self._send.send_nowait(op)
        except anyio.WouldBlock:
            await self._send.send(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error
        result: T = op.result
        return result

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        """The writer task: drain what is queued, commit it as one transaction, wake the callers."""
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                with anyio.CancelScope(shield=True):  # a commit is never cut in half
                    await anyio.to_thread.run_sync(self._commit, batch)
                for op in batch:
                    op.done.set()

    def _commit(self, batch: list[_Op[Any]]) -> None:
        try:
            with self.ledger.transaction() as tx:
                for op in batch:
                    op.result = op.apply(tx)
            self.commits += 1
        except BaseException as exc:  # every caller of the batch learns the transaction failed
            for op in batch:
                op.error = exc
