"""Futures of the Tinker API: a long operation answers ``{request_id}`` at once, and the client polls
``retrieve_future`` until the result is there.

Submits are retried by the SDK (for up to five minutes) when an answer is lost, so a submit is
keyed (for training requests on ``(model_id, seq_id)``): the same key gets the same request id,
and the operation runs once. A poll waits up to ``poll_timeout`` seconds for the result before
answering ``try_again`` (the SDK gives a poll 45 s). Results are set from any thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Union

USER, SERVER = "user", "server"
"""Error categories (the SDK's ``RequestErrorCategory``): the client's fault, or ours."""

RETAIN_S = 600.0
"""Seconds a result is kept after its first retrieval (a poll whose answer was lost is retried)."""


class TinkerError(Exception):
    """An operation's failure, as the client will read it: a message and a category."""

    def __init__(self, message: str, category: str = USER) -> None:
        super().__init__(message)
        self.message, self.category = message, category


@dataclass(eq=False)
class FutureRecord:
    """One operation's outcome: a JSON-able dict, protobuf bytes, or an error."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    done: asyncio.Event = field(default_factory=asyncio.Event)
    value: Union[dict, bytes, None] = None
    error: Optional[TinkerError] = None
    retrieved_at: Optional[float] = None


class Futures:
    """Request ids, their outcomes and the dedup keys that lead to them. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, FutureRecord] = {}
        self._by_key: dict[Hashable, str] = {}
        self._keys: dict[str, Hashable] = {}

    def create(self, key: Optional[Hashable] = None) -> tuple[FutureRecord, bool]:
        """A new future (on the running event loop), or the one already made for ``key``.

        Returns:
            ``(record, is_new)``: only a new record's operation should be started.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            self._sweep()
            if key is not None and key in self._by_key and self._by_key[key] in self._records:
                return self._records[self._by_key[key]], False
            record = FutureRecord(uuid.uuid4().hex, loop)
            self._records[record.request_id] = record
            if key is not None:
                self._by_key[key] = record.request_id
                self._keys[record.request_id] = key
            return record, True

    def get(self, request_id: str) -> Optional[FutureRecord]:
        with self._lock:
            return self._records.get(request_id)

    def resolve(self, record: FutureRecord, value: Union[dict, bytes]) -> None:
        """Set the result (any thread)."""
        self._finish(record, value, None)

    def fail(self, record: FutureRecord, error: TinkerError) -> None:
        """Set the error (any thread)."""
        self._finish(record, None, error)

    def _finish(self, record: FutureRecord, value: Any, error: Optional[TinkerError]) -> None:
        if record.done.is_set() or record.value is not None or record.error is not None:
            return
        record.value, record.error = value, error
        try:
            record.loop.call_soon_threadsafe(record.done.set)
        except RuntimeError:  # the server's loop has closed: nobody will poll
            pass

    async def wait(self, record: FutureRecord, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the outcome; True when it is there."""
        try:
            await asyncio.wait_for(record.done.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        with self._lock:
            if record.retrieved_at is None:
                record.retrieved_at = time.monotonic()
        return True

    def _sweep(self) -> None:  # holding the lock
        now = time.monotonic()
        old = [rid for rid, r in self._records.items() if r.retrieved_at is not None and now - r.retrieved_at > RETAIN_S]
        for rid in old:
            del self._records[rid]
            key = self._keys.pop(rid, None)
            if key is not None and self._by_key.get(key) == rid:
                del self._by_key[key]
