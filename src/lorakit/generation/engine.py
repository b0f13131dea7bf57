"""Step-level (continuous) batching, where every row may use its own adapter (or the base).

The engine holds a running batch whose rows join and leave between decode steps: ``add_request``
queues a request, each ``step`` prefills what it can of the queued prompts (long ones in chunks,
so a long prompt never stalls the rows that are decoding) and then runs one decode step for every
running row; a finished or aborted row leaves the batch at once. Whatever mix of adapters the rows
use, a step is one forward pass: the LoRA layers route rows to their adapters (``route_adapters``).
``generate`` and ``stream`` run a list of requests to completion on top of the same steps. The
engine knows nothing of HTTP; the server and the RL recipe both drive it. Adapter weights can be
replaced in place between steps (``update_adapter``): no reload from disk, no new modules. One
thread drives an engine at a time.

A forward (or sampling) that fails for a whole batch does not fail the whole batch: the engine
retries the failed rows in halves, down to single rows, and only the rows that fail alone end,
each with a ``RequestFailed`` on its Delta; the others go on exactly as if the failure never
happened (a failed decode step's cache writes are zeroed, seeded rows' draw counters restored).
An error that leaves the device unusable (a CUDA error poisons the whole context) cannot be
isolated: ``step`` raises ``EngineBroken`` and the engine refuses every later step. Under
``lockstep`` (every forward a collective) a failure is not isolated either: the extra forwards
would desynchronise the ranks, so ``step`` raises it as before.
"""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch

from ..data.tokenize import collect_eos_ids
from ..lora import RowRouting, adapter_names, route_adapters, set_adapter_weights
from .cache import RowCache, check_full_attention, new_cache
from .detok import TextState
from .sampling import BatchParams, SeedStream, choose


T = TypeVar("T")


class RequestFailed(RuntimeError):
    """A request failed in an engine step that the rest of its batch survived: it failed again when
    its rows were retried alone. It has left the engine.

    Attributes:
        ident: the request's id (``add_request``'s; the list index for ``generate``/``stream``).
        detail: what went wrong (the message without the request's id).
        cause: the exception its forward or sampling raised.
        client_fault: the request itself is invalid (a token id outside the vocabulary, a position
            past the model's position table): a server answers 400, not 500.
    """

    def __init__(self, ident: int, detail: str, cause: BaseException, client_fault: bool = False) -> None:
        super().__init__(f"request {ident} {detail}")
        self.ident, self.detail, self.cause, self.client_fault = ident, detail, cause, client_fault


class EngineBroken(RuntimeError):
    """A step failed in a way no retry recovers from (a CUDA error leaves the device context
    unusable): every request in flight is lost and the engine refuses every later step."""


@dataclass
class SamplingParams:
    """How one request is decoded."""

    max_new_tokens: int = 128
    """Stop after this many new tokens (finish_reason 'length')."""
    temperature: float = 0.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    stop: Sequence[str] = ()
    """Strings that end the completion (not included in the text)."""
    seed: Optional[int] = None
    """Seed of this request's own generator: the same seed gives the same sample, whatever the batch."""
    ignore_eos: bool = False
    """Keep going past end-of-sequence tokens (benchmarks)."""
    stop_token_ids: Optional[Sequence[int]] = None
    """Token ids that end the completion (reported as ``Completion.stop_token_id``, not in its
    tokens); None: the tokenizer's end-of-sequence ids. ``[]`` stops only at ``max_new_tokens``
    or a stop string (the Tinker API's ``stop=[]``)."""


@dataclass
class Request:
    """One prompt to complete."""

    prompt_ids: list[int]
    adapter: Optional[str] = None
    """Adapter name, or None for the base model."""
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    """What a request produced."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    """log p(token) under the model (before temperature / top-p), one per token in token_ids."""
    finish_reason: str
    """'stop' (end-of-sequence or a stop string) or 'length'."""
    prompt_tokens: int
    stop_token_id: Optional[int] = None
    """The end-of-sequence token that ended the completion (not in token_ids or text), if one did."""
    stop_logprob: Optional[float] = None
    """Its log-prob (RL trains on it: stopping is a choice too)."""


@dataclass
class Delta:
    """A step's new output for one row, as streamed."""

    row: int
    """The request's index in ``generate``/``stream``'s list; its id (from ``add_request``) in ``step``'s output."""
    text: str
    token_id: Optional[int]
    logprob: Optional[float]
    finish_reason: Optional[str] = None
    """'stop' or 'length' on a request's last Delta; 'error' when it failed (see ``error``)."""
    completion: Optional[Completion] = None
    """The request's whole result, on its last Delta."""
    error: Optional[RequestFailed] = None
    """Why the request failed (its only Delta of the step; it has left the engine). ``generate``
    and ``stream`` raise it."""




class _Row:
    """Decoding state of one request: its prefill progress, output text, stop state and generator."""

    def __init__(self, ident: int, request: Request, tokenizer: Any, eos: set[int], device: torch.device) -> None:
        stop_ids = request.params.stop_token_ids
        self.id, self.request = ident, request
        self.eos = eos if stop_ids is None else set(stop_ids)
        self.out = TextState(tokenizer, tuple(request.params.stop))
        self.logprobs: list[float] = []
        self.finish: Optional[str] = None
        self.stop_token: Optional[int] = None
        self.stop_logprob: Optional[float] = None
        seed = request.params.seed
        self.stream = SeedStream(seed) if seed is not None else None
        self.prefilled = 0  # prompt tokens already in ``cache`` (chunked prefill)
        self.cache: Any = None  # this row's own cache until its prefill is done and it joins the batch
        self.next_token = 0  # fed to the model at the next decode step

    def push(self, token: int, logprob: float) -> Delta:
        params = self.request.params
        if token in self.eos and not params.ignore_eos:
            self.finish = "stop"
            self.stop_token, self.stop_logprob = token, logprob
            self.out.finish()
            return Delta(self.id, self.out.flush(), None, None, self.finish)
        self.next_token = token
        self.logprobs.append(logprob)
        if self.out.append(token):
            self.finish = "stop"
        elif len(self.out.tokens) >= params.max_new_tokens:
            self.finish = "length"
        if self.finish is not None:
            self.out.finish()
            return Delta(self.id, self.out.flush(), token, logprob, self.finish)
        return Delta(self.id, self.out.stream_delta(), token, logprob)

    def completion(self) -> Completion:
        return Completion(list(self.out.tokens), self.out.text, list(self.logprobs), self.finish or "length",
                          len(self.request.prompt_ids), self.stop_token, self.stop_logprob)


class Engine:
    """Continuous batching over requests that each have their own adapter and sampling parameters.

    Args:
        model: a transformers causal LM (LoRA adapters injected or not).
        tokenizer: its tokenizer (decodes the output; its end-of-sequence ids stop a row).
        lockstep: for data-parallel sampling where every forward is a collective (FSDP2). Called
            once per step with "this rank still has rows"; returns "some rank still has rows"
            (an all-reduce). While it returns True and this rank has no rows, the step runs a
            dummy one-token forward, and every step runs exactly one forward, so all ranks make
            the same number of model calls.
        max_num_seqs: rows decoded together at most; further requests wait.
        prefill_chunk: prompt tokens prefilled per step at most (prompts longer than that are
            prefilled over several steps, between the decode steps of the other rows).
        max_num_batched_tokens: KV-cache tokens the running batch may hold, counted as rows x the
            longest row's prompt + max_new_tokens (each row has a slot as long as the longest, and
            that room is reserved when the row joins, so a batch admitted never runs out of it);
            a request that would pass it waits, one that could never fit is refused. The buffers
            grow geometrically, so they may hold up to twice the columns counted. None: rows are
            bounded by ``max_num_seqs`` only and the cache grows as rows need.
    """

    def __init__(self, model: Any, tokenizer: Any, lockstep: Optional[Callable[[bool], bool]] = None,
                 max_num_seqs: int = 256, prefill_chunk: int = 2048,
                 max_num_batched_tokens: Optional[int] = None) -> None:
        if max_num_seqs < 1 or prefill_chunk < 1:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) and prefill_chunk ({prefill_chunk}) must be >= 1")
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= 1")
        check_full_attention(getattr(model, "config", None))
        self.model = model
        self.tokenizer = tokenizer
        self.lockstep = lockstep
        self.max_num_seqs, self.prefill_chunk = max_num_seqs, prefill_chunk
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos = set(collect_eos_ids(tokenizer, getattr(model, "generation_config", None)))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        accepted = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in accepted
        # transformers >= 5.24 names the cache argument ``cache`` (``past_key_values`` warns, and goes in 5.40)
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._waiting: deque[_Row] = deque()  # not started
        self._prefilling: list[_Row] = []  # admitted; prompt partly prefilled into the row's own cache
        self._running: list[_Row] = []  # rows of ``_batch``, in its order
        self._batch = RowCache(max_num_seqs)
        self._params: Optional[BatchParams] = None  # the running rows' sampling tensors (None: rebuild)
        self._routing: Optional[RowRouting] = None  # the running rows' adapter routes (None: rebuild)
        self._next_id = 0
        self._others_busy = False  # what ``lockstep`` last answered
        self.broken: Optional[BaseException] = None
        """The error that made the engine unusable (``EngineBroken``), or None."""
        self.steps = 0
        """Decode steps run so far."""
        self.largest_batch = 0
        """Most rows decoded together in one step so far."""
        self.prefill_tokens = 0
        """Prompt tokens run through the model so far (with padding); rows prefilled together that
        share a prompt and an adapter (n completions of one prompt) count it once."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def adapters(self) -> list[str]:
        return adapter_names(self.model)

    def update_adapter(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Replace adapter ``name``'s weights in place (keys as ``adapter_state_dict`` gives them)."""
        set_adapter_weights(self.model, tensors, name)

    def adapters_changed(self) -> None:
        """Call after loading or deleting adapters while requests are in flight (between steps):
        the running batch's adapter routes are rebuilt for the model's new LoRA modules."""
        self._routing = None

    # --- step-wise API ------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        """Requests admitted to the batch (prefilling or decoding)."""
        return len(self._prefilling) + len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued behind ``max_num_seqs``."""
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def add_request(self, request: Request) -> int:
        """Queue ``request``; it joins the batch at a coming step. Returns its id (Delta.row in ``step``)."""
        self._check(request)
        ident = self._next_id
        self._next_id += 1
        self._waiting.append(_Row(ident, request, self.tokenizer, self.eos, self.device))
        return ident

    def abort(self, ident: int) -> bool:
        """Drop request ``ident`` wherever it is (its batch slot is freed now); False if unknown or done."""
        for i, row in enumerate(self._waiting):
            if row.id == ident:
                del self._waiting[i]
                return True
        for i, row in enumerate(self._prefilling):
            if row.id == ident:
                del self._prefilling[i]
                return True
        gone = [i for i, row in enumerate(self._running) if row.id == ident]
        if not gone:
            return False
        self._leave(gone)
        return True

    def requests_using(self, adapter: str) -> list[int]:
        """Ids of the unfinished requests that name ``adapter``."""
        return [r.id for r in (*self._waiting, *self._prefilling, *self._running) if r.request.adapter == adapter]

    @torch.no_grad()
    def step(self) -> list[Delta]:
        """Admit waiting requests, prefill (a chunk of) their prompts, then decode one token for every
        running row. Returns one Delta per token produced (``Delta.row`` = request id; its text may be
        empty while a character or a possible stop string is incomplete; a finished request's last
        Delta carries its Completion; a request that failed on its own gets a Delta with a
        ``RequestFailed``, and the rest of the batch goes on).

        Raises:
            EngineBroken: the device is unusable (this step's or an earlier one's CUDA error).
        """
        if self.broken is not None:
            raise EngineBroken(f"the engine stopped after {type(self.broken).__name__}: {self.broken}")
        has_rows = self.has_unfinished()
        if self.lockstep is not None:
            self._others_busy = bool(self.lockstep(has_rows))
            if not self._others_busy:
                return []
        elif not has_rows:
            return []
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            if not has_rows:
                self._dummy_forward()
                return []
            self._admit()
            deltas: list[Delta] = []
            if self.lockstep is not None and self._prefilling:
                self._prefill(deltas, self.prefill_chunk, one_forward=True)
                return deltas
            self._prefill(deltas, self.prefill_chunk)
            if self._running:
                self._decode(deltas)
            return deltas
        finally:
            if was_training:
                self.model.train()

    # --- whole-request API -------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], on_delta: Optional[Callable[[list[Delta]], None]] = None) -> list[Completion]:
        """Run ``requests`` to completion; ``on_delta`` sees each step's new text (Delta.row = list index).

        Raises:
            RequestFailed: a request failed on its own (``ident`` = its list index); the others are aborted.
        """
        results: list[Optional[Completion]] = [
            Completion([], "", [], "length", len(r.prompt_ids)) if r.params.max_new_tokens <= 0 else None
            for r in requests]  # nothing to sample: done before any forward
        for deltas in self._run(requests):
            for delta in deltas:
                if delta.completion is not None:
                    results[delta.row] = delta.completion
            if on_delta is not None:
                on_delta(deltas)
        return results  # type: ignore[return-value]

    def stream(self, requests: Sequence[Request]) -> Iterator[list[Delta]]:
        """Yield, after each step, the new text of every row that produced some (Delta.row = list index)."""
        yield from self._run(requests)

    def _run(self, requests: Sequence[Request]) -> Iterator[list[Delta]]:
        if self.has_unfinished():
            raise RuntimeError("generate()/stream() need an idle engine; this one has requests added with "
                               "add_request() in flight (drive those with step())")
        for request in requests:  # every request checked before any starts
            self._check(request)
        index = {self.add_request(request): i for i, request in enumerate(requests)
                 if request.params.max_new_tokens > 0}
        try:
            while self.lockstep is not None or self.has_unfinished():  # under lockstep: until no rank has rows
                deltas = [d for d in self.step() if d.row in index and (d.text or d.finish_reason)]
                for delta in deltas:
                    delta.row = index[delta.row]
                    if delta.error is not None:
                        err = delta.error
                        raise RequestFailed(delta.row, err.detail, err.cause, err.client_fault) from err.cause
                if deltas:
                    yield deltas
                if self.lockstep is not None and not self._others_busy:
                    break
        finally:  # a consumer that stops early frees the rows
            for ident in index:
                self.abort(ident)

    # --- internals ---------------------------------------------------------------------------------
    def _check(self, request: Request) -> None:
        if request.adapter is not None and request.adapter not in self.adapters():
            raise ValueError(f"unknown adapter '{request.adapter}'; loaded: {sorted(self.adapters())}")
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        budget = self.max_num_batched_tokens
        if budget is not None and _reserved(request) > budget:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; with max_new_tokens="
                             f"{request.params.max_new_tokens} it needs {_reserved(request)} cache tokens, more "
                             f"than this engine's max_num_batched_tokens of {budget}")

    def _admit(self) -> None:
        budget = self.max_num_batched_tokens
        rows = self.num_running
        longest = max((_reserved(r.request) for r in (*self._prefilling, *self._running)), default=0)
        while self._waiting and rows < self.max_num_seqs:
            if budget is not None:
                need = max(longest, _reserved(self._waiting[0].request))
                if rows and (rows + 1) * need > budget:
                    break  # waits for rows to leave
                longest = need
            self._prefilling.append(self._waiting.popleft())
            rows += 1

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """Next-token logits (rows, vocab) at each row's last column."""
        extra = {"logits_to_keep": 1} if self._keeps_logits else {}
        extra[self._cache_arg] = cache
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        return out.logits[:, -1]

    def _dummy_forward(self) -> None:
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        extra = {"logits_to_keep": 1} if self._keeps_logits else {}
        self.model(input_ids=ids, use_cache=False, **extra)

    def _prefill(self, deltas: list[Delta], budget: int, one_forward: bool = False) -> None:
        """Prefill within ``budget`` prompt tokens: whole short prompts together in one left-padded
        forward, a prompt longer than what is left of the budget alone, a chunk per step."""
        while budget > 0 and self._prefilling:
            head = self._prefilling[0]
            left = len(head.request.prompt_ids) - head.prefilled
            if not head.prefilled and budget < left <= self.prefill_chunk:
                break  # fits a whole step's budget: wait for the next step rather than split it
            if head.prefilled or left > budget:
                group, used = [head], min(left, budget)
                self._prefill_chunk(head, used, deltas)
            else:
                # Rows with the same prompt and adapter (n completions of one prompt) share one
                # prefill: only distinct prompts count against the budget.
                group, width, distinct = [], 0, set()
                for row in self._prefilling:
                    w = max(width, len(row.request.prompt_ids))
                    key = _prefix_key(row.request)
                    if row.prefilled or w * (len(distinct | {key})) > budget:
                        break
                    group.append(row)
                    width = w
                    distinct.add(key)
                used = width * len(distinct)
                self._prefill_whole(group, deltas)
            budget -= used
            for row in group:  # done, or failed (then it has left already)
                if row.prefilled == len(row.request.prompt_ids) and row in self._prefilling:
                    self._prefilling.remove(row)
            if one_forward:
                break

    def _prefill_chunk(self, row: _Row, n: int, deltas: list[Delta]) -> None:
        """The next ``n`` prompt tokens of ``row``, alone, into its own cache."""
        device = self.device
        start = row.prefilled
        last = start + n == len(row.request.prompt_ids)

        def attempt(group: list[_Row]) -> Optional[list[tuple[int, float]]]:
            ids = torch.tensor([row.request.prompt_ids[start:start + n]], device=device)
            if row.cache is None:
                row.cache = new_cache()
            mask = torch.ones(1, start + n, dtype=torch.long, device=device)
            positions = torch.arange(start, start + n, device=device)[None]
            with route_adapters(self.model, [row.request.adapter]):
                logits = self._forward(ids, mask, positions, row.cache)
            return self._choose(logits, _batch_params([row], device)) if last else None

        # A failed chunk may have written some layers of the row's own cache: the row leaves with it.
        done, failed = self._isolate([row], attempt)
        for _, choices in done:
            row.prefilled += n
            if last:
                self._first_tokens([row], row.cache, choices, deltas)
        self._fail(failed, deltas)

    def _prefill_whole(self, rows: list[_Row], deltas: list[Delta]) -> None:
        """Whole prompts of ``rows`` in one forward, left-padded so every row ends in the last column.

        Rows that repeat an earlier row's prompt and adapter are not run: they take that row's cache
        and next-token logits (the forward is the same function of the same tokens)."""
        device = self.device
        def attempt(group: list[_Row]) -> tuple[Any, list[tuple[int, float]], Optional[list[int]]]:
            first: dict[tuple, int] = {}  # prefix -> its row in the forward
            unique: list[_Row] = []
            source = []
            for r in group:
                j = first.setdefault(_prefix_key(r.request), len(unique))
                if j == len(unique):
                    unique.append(r)
                source.append(j)
            width = max(len(r.request.prompt_ids) for r in unique)
            ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(unique), width), dtype=torch.long)
            for i, row in enumerate(unique):
                prompt = row.request.prompt_ids
                ids[i, width - len(prompt):] = torch.tensor(prompt)
                mask[i, width - len(prompt):] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = new_cache()  # a failed attempt's cache is dropped with it
            with route_adapters(self.model, [r.request.adapter for r in unique]):
                logits = self._forward(ids, mask, positions, cache)
            self.prefill_tokens += ids.numel()
            if len(unique) == len(group):
                return cache, self._choose(logits, _batch_params(group, device)), None
            logits = logits[torch.tensor(source, device=logits.device)]
            return cache, self._choose(logits, _batch_params(group, device)), source

        done, failed = self._isolate(rows, attempt)
        for group, (cache, choices, source) in done:
            for row in group:
                row.prefilled = len(row.request.prompt_ids)
            self._first_tokens(group, cache, choices, deltas, source=source)
        self._fail(failed, deltas)

    def _first_tokens(self, rows: list[_Row], cache: Any, choices: list[tuple[int, float]],
                      deltas: list[Delta], source: Optional[list[int]] = None) -> None:
        """Freshly prefilled ``rows`` (sharing ``cache``, left-padded, each row's prompt in its last
        columns; ``source[j]``: the cache row of row j, default j) join the batch with their first
        tokens; those already finished leave it at once."""
        for row in rows:
            row.cache = None
        reserve = max(_reserved(r.request) for r in rows) if self.max_num_batched_tokens is not None else 0
        self._batch.add(cache, [len(r.request.prompt_ids) for r in rows], reserve, source=source)
        self._running.extend(rows)
        self._params = None
        finished = self._push(rows, choices, deltas, offset=len(self._running) - len(rows))
        if finished:
            self._leave(finished)

    def _decode(self, deltas: list[Delta]) -> None:
        rows = self._running
        if self._params is None:
            self._params = _batch_params(rows, self.device)
            self._routing = None
        # Routes are reused while the rows and the loaded adapters stay the same (the LoRA layers
        # cache their per-batch tensors on them).
        if self._routing is None:
            self._routing = RowRouting(self.model, [r.request.adapter for r in rows])
        slot = {id(r): i for i, r in enumerate(rows)}

        def attempt(group: list[_Row]) -> list[tuple[int, float]]:
            ids = torch.tensor([[r.next_token] for r in group], device=self.device)
            if len(group) == len(rows):  # the whole batch: the usual step
                mask, positions = self._batch.step_inputs()
                with self._routing.apply():
                    logits = self._forward(ids, mask, positions, self._batch.cache)
                return self._choose(logits, self._params)
            # Retrying part of a failed step: those rows' slots only, routed and sampled on their own.
            with self._batch.only([slot[id(r)] for r in group]):
                mask, positions = self._batch.step_inputs()
                with route_adapters(self.model, [r.request.adapter for r in group]):
                    logits = self._forward(ids, mask, positions, self._batch.cache)
            return self._choose(logits, _batch_params(group, self.device))

        def undo(group: list[_Row]) -> None:
            # The failed forward wrote (some layers of) its column at each row's length: zeroed, so a
            # NaN it may have left cannot reach a later step through a masked column.
            self._batch.discard([slot[id(r)] for r in group])
            self._params = None  # its device-side draw counters may have advanced

        done, failed = self._isolate(rows, attempt, undo)
        self._batch.advance()
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        finished = []
        for group, choices in done:
            finished += [slot[id(group[i])] for i in self._push(group, choices, deltas, offset=0)]
        gone = finished + [slot[id(row)] for row, _ in failed]
        self._fail(failed, deltas, leave=False)
        if gone:
            self._leave(gone)

    def _choose(self, logits: torch.Tensor, params: BatchParams) -> list[tuple[int, float]]:
        """Each row's next token and its log-prob, read back in one host synchronisation (where a
        device's asynchronous error surfaces, so it is inside the attempt that caused it)."""
        tokens, logprobs = choose(logits, params)
        pairs = torch.stack([tokens.double(), logprobs.double()]).tolist()
        return [(int(t), lp) for t, lp in zip(*pairs)]

    def _push(self, rows: list[_Row], choices: list[tuple[int, float]], deltas: list[Delta], offset: int) -> list[int]:
        """Record the chosen tokens of ``rows``; returns the finished ones as indices into ``rows``
        plus ``offset`` (their place in ``_running`` when ``rows`` are its slice from ``offset``)."""
        finished = []
        for i, (row, (token, logprob)) in enumerate(zip(rows, choices)):
            delta = row.push(token, logprob)
            if row.finish is not None:
                delta.completion = row.completion()
                finished.append(offset + i)
            deltas.append(delta)
        return finished

    def _isolate(self, rows: list[_Row], attempt: Callable[[list[_Row]], T],
                 undo: Optional[Callable[[list[_Row]], None]] = None,
                 ) -> tuple[list[tuple[list[_Row], T]], list[tuple[_Row, Exception]]]:
        """Run ``attempt(rows)``; if it raises, undo its effects and retry the rows in halves, down
        to single rows, so only the rows that fail alone fail.

        One bad row among n costs about 2 log2(n) extra forwards, on the failure path only. An
        error that retries cannot help (the device is unusable) raises ``EngineBroken``; under
        ``lockstep`` nothing is retried (every forward is a collective) and the error propagates.

        Returns:
            The groups that succeeded with what their attempt returned, in row order, and the rows
            that failed alone with their error.
        """
        if self.lockstep is not None:
            return [(rows, attempt(rows))], []
        done: list[tuple[list[_Row], T]] = []
        failed: list[tuple[_Row, Exception]] = []
        pending = [rows]
        while pending:
            group = pending.pop()
            draws = [(r.stream, r.stream.draws) for r in group if r.stream is not None]
            try:
                done.append((group, attempt(group)))
                continue
            except Exception as err:
                if _unrecoverable(err):
                    self.broken = err
                    raise EngineBroken(f"the engine cannot go on after {type(err).__name__}: {err}; every request "
                                       "in flight is lost (restart the process)") from err
                error = err
            for stream, n in draws:  # a retry draws the same numbers the failed attempt would have
                stream.draws = n
            if undo is not None:
                undo(group)
            if len(group) == 1:
                failed.append((group[0], error))
            else:
                half = len(group) // 2
                pending += [group[half:], group[:half]]  # the first half is retried first
        return done, failed

    def _fail(self, failed: list[tuple[_Row, Exception]], deltas: list[Delta], leave: bool = True) -> None:
        """End the rows that failed alone, each with a ``RequestFailed`` naming it (a Delta with
        ``finish_reason='error'``); with ``leave`` they are taken out of the prefill queue or the batch."""
        for row, err in failed:
            fault = self._fault(row)
            where = f"{len(row.request.prompt_ids)} prompt tokens, {len(row.out.tokens)} generated"
            adapter = f"adapter '{row.request.adapter}'" if row.request.adapter is not None else "the base model"
            if fault is not None:
                detail = f"is invalid: {fault}"
            else:
                detail = (f"({adapter}, {where}) failed in the engine, also when run alone "
                          f"(the other requests of its batch went on): {type(err).__name__}: {err}")
            row.finish, row.cache = "error", None
            error = RequestFailed(row.id, detail, err, client_fault=fault is not None)
            deltas.append(Delta(row.id, "", None, None, "error", error=error))
            if leave:
                if row in self._prefilling:
                    self._prefilling.remove(row)
                elif row in self._running:
                    self._leave([self._running.index(row)])

    def _fault(self, row: _Row) -> Optional[str]:
        """What is wrong with a failed row's request itself, if anything the engine can tell:
        a prompt token id outside the embedding table, or a position past an absolute position table."""
        vocab = self._vocab_size()
        bad = next((t for t in row.request.prompt_ids if not 0 <= t < vocab), None) if vocab else None
        if bad is not None:
            return (f"'prompt' holds token id {bad}, outside the model's vocabulary of {vocab} ids "
                    f"(0 to {vocab - 1})")
        positions, key = _position_table(self.model)
        position = len(row.request.prompt_ids) + len(row.out.tokens) - 1  # of the last token fed
        if positions is not None and position >= positions:
            return (f"'prompt' ({len(row.request.prompt_ids)} tokens) and the {len(row.out.tokens)} tokens generated "
                    f"reach position {position}, past the model's {positions} positions (config.{key})")
        return None

    def _vocab_size(self) -> Optional[int]:
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        rows = getattr(embeddings, "num_embeddings", None)
        return int(rows) if rows is not None else getattr(getattr(self.model, "config", None), "vocab_size", None)

    def _leave(self, gone: list[int]) -> None:
        """Rows ``gone`` (indices into ``_running``) leave; the cache chooses the new order (it moves
        the last rows into the freed slots rather than shifting every row)."""
        order = self._batch.remove(gone)
        self._running = [self._running[i] for i in order]
        self._params = None


def _prefix_key(request: Request) -> tuple:
    """Rows with equal keys have the same prefill: same prompt tokens through the same adapter."""
    return (request.adapter, tuple(request.prompt_ids))


def _unrecoverable(err: Exception) -> bool:
    """Whether ``err`` leaves the device unusable (a CUDA error: the context is poisoned, and every
    later kernel fails too), so retrying rows cannot help. An out-of-memory error is recoverable."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    accelerator = getattr(torch, "AcceleratorError", None)
    return (accelerator is not None and isinstance(err, accelerator)) or "CUDA error" in str(err)


def _position_table(model: Any) -> tuple[Optional[int], Optional[str]]:
    """The size of the model's absolute position-embedding table (GPT-2's ``wpe``) and the config key
    that gives it, or (None, None) for models without one (rotary positions have no table to pass)."""
    config = getattr(model, "config", None)
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for key in ("n_positions", "max_position_embeddings"):
        size = getattr(config, key, None)
        if isinstance(size, int) and any(isinstance(m, torch.nn.Embedding) and m is not tokens
                                         and m.num_embeddings == size for m in model.modules()):
            return size, key
    return None, None


def _reserved(request: Request) -> int:
    """Cache tokens a request may hold: its prompt and every token it may generate."""
    return len(request.prompt_ids) + max(0, request.params.max_new_tokens)


def _batch_params(rows: Sequence[_Row], device: torch.device) -> BatchParams:
    params = [r.request.params for r in rows]
    return BatchParams([p.temperature for p in params], [p.top_p for p in params], [p.top_k for p in params],
                       [r.stream for r in rows], device)
