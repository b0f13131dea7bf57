"""Drives the generation engine step by step on one worker thread, for requests that come and go.

Requests join the engine's running batch between decode steps (continuous batching) whatever
adapters they name; a cancelled request (its client went away) leaves the batch at the next step
boundary. Model changes (loading, unloading adapters) run on the worker thread between steps.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from ..generation import Delta, Engine, Request

T = TypeVar("T")


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclass
class LoopSink:
    """A sink that puts items on an asyncio queue of ``loop``. The scheduler hands a step's items
    for one loop over in a single thread-safe call (one wake-up per step, not one per token)."""

    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[Any]"

    def __call__(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(items: list[tuple["asyncio.Queue[Any]", Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


@dataclass
class Ticket:
    """A submitted request. ``sink`` receives, on the worker thread, its Deltas, then its Completion
    or an exception (LookupError: its adapter was unloaded; anything else: the engine failed)."""

    request: Request
    sink: Callable[[Any], None]
    ident: Optional[int] = None  # the engine's id once added
    done: bool = False
    cancelled: bool = field(default=False, repr=False)


class Scheduler:
    """One worker thread owns the engine: it takes new requests and cancellations between steps and
    runs steps while any request is unfinished.

    Args:
        engine: the generation engine (its ``max_num_seqs`` bounds the running batch).
        max_queue: requests that may wait for a slot; one more is refused with ``QueueFull``.
    """

    def __init__(self, engine: Engine, max_queue: int = 256) -> None:
        self.engine, self.max_queue = engine, max_queue
        self._inbox: deque[Callable[[], None]] = deque()
        self._queued = 0  # submitted, not yet handed to the engine
        self._cond = threading.Condition()
        self._live: dict[int, Ticket] = {}
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        """Requests in the engine's batch (prefilling or decoding)."""
        return self.engine.num_running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot in the batch."""
        return self._queued + self.engine.num_waiting

    def submit(self, request: Request, sink: Callable[[Any], None]) -> Ticket:
        """Queue ``request``; raises ``QueueFull`` when ``max_queue`` requests are waiting already."""
        ticket = Ticket(request, sink)
        with self._cond:
            if self.waiting >= self.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting (--max-queue {self.max_queue})")
            self._queued += 1
            self._inbox.append(lambda: self._add(ticket))
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop ``ticket``'s request (if still running) and free its slot at the next step boundary."""
        with self._cond:
            ticket.cancelled = True
            self._inbox.append(lambda: self._abort(ticket))
            self._cond.notify()

    def exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread between two steps; returns its result or raises its error."""
        result: dict[str, Any] = {}
        finished = threading.Event()

        def call() -> None:
            try:
                result["value"] = fn()
            except BaseException as err:  # handed back to the caller's thread
                result["error"] = err
            self.engine.adapters_changed()
            finished.set()

        with self._cond:
            self._inbox.append(call)
            self._cond.notify()
        finished.wait()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def fail_requests_using(self, adapter: str) -> None:
        """End every unfinished request naming ``adapter`` with a LookupError (call inside ``exclusive``)."""
        for ident in self.engine.requests_using(adapter):
            self.engine.abort(ident)
            self._end(self._live.pop(ident), LookupError(f"adapter '{adapter}' was unloaded"))

    # --- worker thread ------------------------------------------------------------------------------
    def _add(self, ticket: Ticket) -> None:
        with self._cond:
            self._queued -= 1
        if ticket.cancelled:
            return
        try:
            ticket.ident = self.engine.add_request(ticket.request)
        except ValueError as err:  # e.g. its adapter was unloaded since the request was accepted
            self._end(ticket, LookupError(str(err)) if "adapter" in str(err) else err)
            return
        self._live[ticket.ident] = ticket

    def _abort(self, ticket: Ticket) -> None:
        if ticket.ident is not None and self._live.pop(ticket.ident, None) is not None:
            self.engine.abort(ticket.ident)
            ticket.done = True

    @staticmethod
    def _end(ticket: Ticket, item: Any) -> None:
        ticket.done = True
        ticket.sink(item)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self.engine.has_unfinished():
                    self._cond.wait()
                commands = list(self._inbox)
                self._inbox.clear()
            for command in commands:
                command()
            if not self.engine.has_unfinished():
                continue
            try:
                deltas: list[Delta] = self.engine.step()
            except Exception as err:  # the engine failed: every request in flight hears it, the server lives on
                for ident, ticket in list(self._live.items()):
                    self.engine.abort(ident)
                    self._end(ticket, err)
                self._live.clear()
                continue
            out: list[tuple[Ticket, Any]] = []
            for delta in deltas:
                ticket = self._live.get(delta.row)
                if ticket is None:
                    continue
                out.append((ticket, delta))
                if delta.completion is not None:
                    del self._live[delta.row]
                    ticket.done = True
                    out.append((ticket, delta.completion))
            self._deliver(out)

    @staticmethod
    def _deliver(items: list[tuple[Ticket, Any]]) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = defaultdict(list)
        for ticket, item in items:
            if isinstance(ticket.sink, LoopSink):
                per_loop[ticket.sink.loop].append((ticket.sink.queue, item))
            else:
                ticket.sink(item)
        for loop, batch in per_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)
