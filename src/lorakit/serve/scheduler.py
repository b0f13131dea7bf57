"""Batches requests that are in flight together, across adapters, onto the generation engine."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from ..generation import Completion, Delta, Engine, Request

T = TypeVar("T")


@dataclass
class Pending:
    """A request waiting for the engine, and where its output goes (Delta..., then Completion or an error)."""

    request: Request
    out: "queue.Queue[Any]" = field(default_factory=queue.Queue)


class Scheduler:
    """One worker thread runs the engine. Whatever is queued when it starts a batch (after a short
    wait for stragglers) runs as one batch, whatever adapters the requests name. Changes to the
    model (loading, unloading adapters) go through ``exclusive`` and never overlap a batch."""

    def __init__(self, engine: Engine, max_batch: int = 16, wait_s: float = 0.01) -> None:
        self.engine, self.max_batch, self.wait_s = engine, max_batch, wait_s
        self._queue: "queue.Queue[Pending]" = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        self.batches: list[int] = []  # sizes of the batches run so far (for tests and logs)

    def submit(self, request: Request) -> Pending:
        pending = Pending(request)
        self._queue.put(pending)
        return pending

    def exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` while no batch is running (model changes happen between batches)."""
        with self._lock:
            return fn()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            with self._lock:
                self._run(batch)

    def _run(self, batch: list[Pending]) -> None:
        def dispatch(deltas: list[Delta]) -> None:
            for delta in deltas:
                batch[delta.row].out.put(delta)

        # A request naming an adapter unloaded since it was accepted fails alone, not the batch.
        known = set(self.engine.adapters())
        runnable = []
        for pending in batch:
            if pending.request.adapter is not None and pending.request.adapter not in known:
                pending.out.put(LookupError(f"adapter '{pending.request.adapter}' was unloaded"))
            else:
                runnable.append(pending)
        batch[:] = runnable
        if not batch:
            return
        self.batches.append(len(batch))
        try:
            results: list[Optional[Completion]] = self.engine.generate([p.request for p in batch], on_delta=dispatch)
        except Exception as err:  # the engine failed: every waiting client hears it, the server lives on
            for pending in batch:
                pending.out.put(err)
            return
        for pending, result in zip(batch, results):
            pending.out.put(result)
