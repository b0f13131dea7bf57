"""Drives the generation engine step by step on one worker thread, for requests that come and go.

Requests join the engine's running batch between decode steps (continuous batching) whatever
adapters they name; a cancelled request (its client went away) leaves the batch at the next step
boundary. Model changes (loading, unloading adapters) run on the worker thread between steps.

An error that belongs to one request (the engine refuses it, its listener is gone, or its rows
fail a step on their own: the engine retries a failed step's rows apart and reports only those)
ends that request only, and the rest of the batch decodes on. A step that fails outside any row
ends the requests in flight and the worker goes on. A ``BaseException``, an engine that cannot
go on (``EngineBroken``: a CUDA error poisons the device) or one that cannot even drop its rows
after a failure stops the worker: then every pending request and call hears ``WorkerDead`` at
once, new ones are refused, and ``alive`` turns False (the server's ``/health`` answers 503).
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from ..generation import Delta, Engine, EngineBroken, Request

T = TypeVar("T")


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already."""


class WorkerDead(RuntimeError):
    """The worker thread has stopped (a ``BaseException`` escaped it, or the engine could not be
    brought back to a consistent state after an error): nothing more can run on this scheduler."""


class AdapterUnloaded(LookupError):
    """The request names an adapter that is not (or no longer) loaded."""


class Rejected(ValueError):
    """The engine refused the request itself (``add_request`` raised ValueError, or its rows failed
    a step because of what the request holds): the client's fault."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param
        """The request field at fault, when known (the engine's step faults are all in the prompt)."""


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


@dataclass(eq=False)
class Ticket:
    """A submitted request. ``sink`` receives, on the worker thread, its Deltas, then its Completion
    or an exception: ``AdapterUnloaded``, ``Rejected`` (the engine refused the request),
    ``WorkerDead``, or whatever else failed while it was in flight."""

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
        self._open: set[Ticket] = set()  # submitted, not ended: what a dying worker must answer
        self._exclusives: set[_Exclusive] = set()  # waiting for the worker to run them
        self.error: Optional[BaseException] = None
        """Why the worker thread stopped (None while it runs)."""
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it can die only of a ``BaseException`` or a broken engine)."""
        return self.error is None and self._thread.is_alive()

    def _check_alive(self) -> None:  # call holding ``_cond``
        if not self.alive:
            cause = self.error if self.error is not None else "it exited"
            raise WorkerDead(f"the engine's worker thread has stopped ({type(cause).__name__}: {cause}); "
                             "restart the server")

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
            self._check_alive()
            if self.waiting >= self.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting (--max-queue {self.max_queue})")
            self._queued += 1
            self._open.add(ticket)
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
        """Run ``fn`` on the worker thread between two steps; returns its result or raises its error
        (``WorkerDead`` if the worker has stopped or stops before running it)."""
        job = _Exclusive(fn)
        with self._cond:
            self._check_alive()
            self._exclusives.add(job)
            self._inbox.append(lambda: self._run_exclusive(job))
            self._cond.notify()
        job.finished.wait()
        if job.error is not None:
            raise job.error
        return job.value

    def fail_requests_using(self, adapter: str) -> None:
        """End every unfinished request naming ``adapter`` with ``AdapterUnloaded`` (call inside ``exclusive``)."""
        for ident in self.engine.requests_using(adapter):
            self.engine.abort(ident)
            self._end(self._live.pop(ident), AdapterUnloaded(f"adapter '{adapter}' was unloaded"))

    # --- worker thread ------------------------------------------------------------------------------
    def _run_exclusive(self, job: "_Exclusive") -> None:
        try:
            job.value = job.fn()
        except BaseException as err:  # handed back to the caller's thread
            job.error = err
        finally:
            with self._cond:
                self._exclusives.discard(job)
            self.engine.adapters_changed()
            job.finished.set()

    def _add(self, ticket: Ticket) -> None:
        with self._cond:
            self._queued -= 1
        if ticket.cancelled:
            self._open.discard(ticket)
            return
        request = ticket.request
        try:
            ticket.ident = self.engine.add_request(request)
        except ValueError as err:  # e.g. its adapter was unloaded since the request was accepted
            gone = request.adapter is not None and request.adapter not in self.engine.adapters()
            self._end(ticket, AdapterUnloaded(str(err)) if gone else Rejected(str(err)))
            return
        except Exception as err:  # anything else this one request caused ends it, and only it
            self._end(ticket, err)
            return
        self._live[ticket.ident] = ticket

    def _abort(self, ticket: Ticket) -> None:
        self._open.discard(ticket)
        if ticket.ident is not None and self._live.pop(ticket.ident, None) is not None:
            self.engine.abort(ticket.ident)
            ticket.done = True

    def _end(self, ticket: Ticket, item: Any) -> None:
        ticket.done = True
        self._open.discard(ticket)
        try:
            ticket.sink(item)
        except Exception:  # nobody is listening any more (its event loop is gone): nothing to tell
            pass

    def _loop(self) -> None:
        try:
            self._work()
        except BaseException as err:
            self._die(err)
            raise  # the thread's excepthook logs why the server stopped serving

    def _die(self, err: BaseException) -> None:
        """The worker stops for good: every request and exclusive call still pending hears it."""
        with self._cond:
            self.error = err
            self._inbox.clear()
            self._queued = 0
            tickets, self._open = list(self._open), set()
            jobs, self._exclusives = list(self._exclusives), set()
        self._live.clear()
        dead = WorkerDead(f"the engine's worker thread stopped ({type(err).__name__}: {err})")
        for ticket in tickets:
            self._end(ticket, dead)
        for job in jobs:
            job.error = dead
            job.finished.set()

    def _work(self) -> None:
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
            except EngineBroken:
                raise  # the device is unusable: the worker dies, every request hears it, /health says so
            except Exception as err:  # the engine failed outside any row: the requests in flight hear it
                self._fail_in_flight(err)
                continue
            out: list[tuple[Ticket, Any]] = []
            for delta in deltas:
                ticket = self._live.get(delta.row)
                if ticket is None:
                    continue
                if delta.error is not None:  # this request failed alone; it has left the engine
                    del self._live[delta.row]
                    ticket.done = True
                    self._open.discard(ticket)
                    error = delta.error
                    out.append((ticket, Rejected(str(error), "prompt") if error.client_fault else error))
                    continue
                out.append((ticket, delta))
                if delta.completion is not None:
                    del self._live[delta.row]
                    ticket.done = True
                    self._open.discard(ticket)
                    out.append((ticket, delta.completion))
            for ticket in self._deliver(out):  # their clients are gone: free their slots
                self._abort(ticket)

    def _fail_in_flight(self, err: Exception) -> None:
        """After a failed step: the requests in the engine end with ``err`` (their clients hear it
        first), then leave it. If the engine cannot even drop them, it is broken: that error
        propagates and the worker dies (``/health`` says so) rather than serve from a bad state."""
        tickets = list(self._live.items())
        self._live.clear()
        for _, ticket in tickets:
            self._end(ticket, err)
        for ident, _ in tickets:
            self.engine.abort(ident)

    @staticmethod
    def _deliver(items: list[tuple[Ticket, Any]]) -> list[Ticket]:
        """Hand items to their sinks (one thread-safe call per event loop); returns the tickets
        whose sink failed (their listener is gone)."""
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = defaultdict(list)
        owners: dict[asyncio.AbstractEventLoop, list[Ticket]] = defaultdict(list)
        failed: list[Ticket] = []
        for ticket, item in items:
            if isinstance(ticket.sink, LoopSink):
                per_loop[ticket.sink.loop].append((ticket.sink.queue, item))
                owners[ticket.sink.loop].append(ticket)
                continue
            try:
                ticket.sink(item)
            except Exception:
                failed.append(ticket)
        for loop, batch in per_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed
                failed.extend(owners[loop])
        return list(dict.fromkeys(failed))


@dataclass(eq=False)
class _Exclusive:
    """A function to run on the worker thread between steps, and its outcome."""

    fn: Callable[[], Any]
    finished: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: Optional[BaseException] = None
