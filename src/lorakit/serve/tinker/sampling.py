"""Sampling clients of the Tinker API, served by the step-level engine the OpenAI API uses.

A sampling session names the weights it samples: the base, a ``tinker://`` checkpoint (loaded once
as an adapter and shared by every session that names it), or an ephemeral snapshot a training
client took (``save_weights_and_get_sampling_client``). A request's ``num_samples`` sequences are
engine requests of their own, batched with everyone else's rows whatever adapter those use.
Prompt log-probs (``compute_logprobs``) are one forward over the prompt with the same adapter.
"""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ...data.tokenize import IGNORE
from ...generation import Completion, Request, SamplingParams
from ...lora import active_adapters, delete_adapter, load_read_adapter, read_adapter, route_adapters, set_active_adapters
from ...training.loss import token_logprobs
from ..scheduler import AdapterUnloaded, LoopSink, QueueFull, Rejected, WorkerDead
from . import checkpoints
from .codec import encode_sample, json_tokens, WireError
from .futures import SERVER, USER, FutureRecord, Futures, TinkerError


@dataclass(eq=False)
class Sampler:
    """A sampling session: which adapter (None: the base) its requests use."""

    sampler_id: str
    session_id: str
    adapter: Optional[str]
    model_path: Optional[str]
    owner: Optional[str] = None
    """The training model an ephemeral snapshot belongs to (None: not ephemeral)."""
    inflight: int = 0
    doomed: bool = False
    """Freed: its adapter goes once its last request in flight is done."""
    clients: int = 1


class Samplers:
    """Sampling sessions and their requests.

    Args:
        server: the ``LoraServer``.
        futures: where results go.
        root: the ``--tinker-dir``.
        max_snapshots: ephemeral snapshots a training model keeps; older ones are freed.
    """

    def __init__(self, server: Any, futures: Futures, root: Path, max_snapshots: int) -> None:
        self.server, self.futures, self.root, self.max_snapshots = server, futures, root, max_snapshots
        self.samplers: dict[str, Sampler] = {}
        self._loaded: dict[str, str] = {}  # checkpoint directory -> adapter name
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()

    # --- sessions ---------------------------------------------------------------------------------------
    def create(self, session_id: str, model_path: Any, base_model: Any) -> Sampler:
        """A sampler for a ``tinker://`` path (loaded as an adapter once) or the base model."""
        base = self.server.config.base_name
        if model_path is None:
            if base_model != base:
                raise TinkerError(f"unknown base model {base_model!r}: this server serves {base!r}")
            return self._register(Sampler(f"sampler-{uuid.uuid4().hex[:16]}", session_id, None, None))
        directory, _, _ = checkpoints.resolve(self.root, model_path)
        meta = checkpoints.read_meta(directory)
        if meta.get("base_model", base) != base:
            raise TinkerError(f"{model_path} was trained on {meta.get('base_model')!r}; this server serves {base!r}")
        key = str(directory)
        with self._lock:
            adapter = self._loaded.get(key)
        if adapter is None or adapter not in self.server.engine.adapters():
            adapter = f"ckpt-{uuid.uuid4().hex[:12]}"
            read = read_adapter(directory)

            def load() -> None:
                previous = active_adapters(self.server.model)
                load_read_adapter(self.server.model, read, adapter_name=adapter, trainable=False, activate=False)
                set_active_adapters(self.server.model, previous)
            try:
                self.server.scheduler.exclusive(load)
            except ValueError as err:
                raise TinkerError(f"cannot load {model_path}: {err}") from None
            with self._lock:
                self._loaded[key] = adapter
        return self._register(Sampler(f"sampler-{uuid.uuid4().hex[:16]}", session_id, adapter, model_path))

    def snapshot(self, owner: Any, adapter: str) -> str:
        """Register an ephemeral snapshot adapter of training model ``owner``; frees the oldest
        snapshots past ``max_snapshots``. Returns the sampler id."""
        sampler = self._register(Sampler(f"sampler-{uuid.uuid4().hex[:16]}", owner.session_id, adapter, None,
                                         owner=owner.model_id))
        owner.snapshots.append(sampler.sampler_id)
        while len(owner.snapshots) > self.max_snapshots:
            self.free(owner.snapshots.pop(0))
        return sampler.sampler_id

    def _register(self, sampler: Sampler) -> Sampler:
        with self._lock:
            self.samplers[sampler.sampler_id] = sampler
        return sampler

    def get(self, sampler_id: Any) -> Sampler:
        with self._lock:
            sampler = self.samplers.get(sampler_id) if isinstance(sampler_id, str) else None
        if sampler is None or sampler.doomed:
            raise TinkerError(f"unknown sampling session {sampler_id!r} (an ephemeral snapshot is freed once its "
                              f"training client has taken {self.max_snapshots} newer ones, or its session ended)")
        return sampler

    def join(self, sampler_id: Any) -> int:
        sampler = self.get(sampler_id)
        with self._lock:
            sampler.clients += 1
            return sampler.clients - 1

    def free(self, sampler_id: str) -> None:
        """Forget a sampler; an ephemeral snapshot's adapter is deleted once no request uses it."""
        with self._lock:
            sampler = self.samplers.pop(sampler_id, None)
            if sampler is None:
                return
            sampler.doomed = True
            drop = sampler.owner is not None and sampler.inflight == 0
        if drop:
            self._drop(sampler.adapter)

    def close_session(self, session_id: str) -> None:
        with self._lock:
            ids = [s.sampler_id for s in self.samplers.values() if s.session_id == session_id]
        for sampler_id in ids:
            self.free(sampler_id)

    def _drop(self, adapter: Optional[str]) -> None:
        def drop() -> None:
            if adapter is not None and adapter in self.server.engine.adapters():
                delete_adapter(self.server.model, adapter)
        self.server.scheduler.exclusive(drop)

    # --- requests -----------------------------------------------------------------------------------
    def start(self, record: FutureRecord, sampler: Sampler, body: dict) -> list[str]:
        """Check a sample request, start it in the background; returns its sequence ids."""
        params, ids, num, want_prompt = self._parse(body)
        with self._lock:
            sampler.inflight += 1
        task = asyncio.get_running_loop().create_task(self._run(record, sampler, ids, params, num, want_prompt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return [f"{record.request_id}-{i}" for i in range(num)]

    def _parse(self, body: dict) -> tuple[list[SamplingParams], list[int], int, bool]:
        config = self.server.config
        try:
            ids = json_tokens(body.get("prompt"), "prompt")
        except WireError as err:
            raise TinkerError(str(err)) from None
        if not ids:
            raise TinkerError("prompt is empty")
        vocab = self.server.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise TinkerError(f"prompt holds token id {bad}, outside the vocabulary (0 to {vocab - 1})")
        num = body.get("num_samples", 1)
        if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= config.max_num_seqs:
            raise TinkerError(f"num_samples must be an integer from 1 to {config.max_num_seqs}, got {num!r}")
        for key in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(key):
                raise TinkerError(f"{key} is not supported by this server")
        if body.get("target_prompt_logprobs") is not None or body.get("prompt_logprobs_last_n") is not None:
            raise TinkerError("target_prompt_logprobs and prompt_logprobs_last_n are not supported by this server")
        sp = body.get("sampling_params") or {}
        max_tokens = sp.get("max_tokens")
        max_tokens = config.default_max_tokens if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= config.max_tokens_limit:
            raise TinkerError(f"max_tokens must be an integer from 1 to {config.max_tokens_limit}, got {max_tokens!r}")
        if len(ids) + max_tokens > config.context_length:
            raise TinkerError(f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds the "
                              f"context of {config.context_length} tokens")
        temperature, top_p, top_k = sp.get("temperature", 1.0), sp.get("top_p", 1.0), sp.get("top_k", -1)
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 100:
            raise TinkerError(f"temperature must be a number >= 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise TinkerError(f"top_p must be in (0, 1], got {top_p!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < -1:
            raise TinkerError(f"top_k must be an integer >= -1 (-1: all), got {top_k!r}")
        seed = sp.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TinkerError(f"seed must be an integer, got {seed!r}")
        stop = sp.get("stop")
        strings: list[str] = []
        stop_ids: Optional[list[int]] = None  # None: the tokenizer's end-of-sequence ids
        if isinstance(stop, str):
            stop = [stop]
        if isinstance(stop, list):
            if all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
                stop_ids = list(stop)  # [] disables every stop token, EOS included
            elif all(isinstance(s, str) and s for s in stop):
                strings = list(stop)
            else:
                raise TinkerError("stop must be a string, a list of strings, or a list of token ids")
        elif stop is not None:
            raise TinkerError("stop must be a string, a list of strings, or a list of token ids")
        params = [SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                                 top_k=max(0, top_k), stop=strings, stop_token_ids=stop_ids,
                                 seed=None if seed is None else seed + i)
                  for i in range(num)]
        return params, ids, num, bool(body.get("prompt_logprobs"))

    async def _run(self, record: FutureRecord, sampler: Sampler, ids: list[int], params: list[SamplingParams],
                   num: int, want_prompt: bool) -> None:
        try:
            prompt = None
            if want_prompt:
                prompt = await asyncio.to_thread(self.server.scheduler.exclusive,
                                                 lambda: prompt_logprobs(self.server.model, ids, sampler.adapter))
            completions = await self._sample(ids, sampler.adapter, params)
            sequences = []
            for done in completions:
                tokens, logprobs = list(done.token_ids), list(done.logprobs)
                if done.stop_token_id is not None:  # the stop token is part of what was sampled
                    tokens.append(done.stop_token_id)
                    logprobs.append(done.stop_logprob if done.stop_logprob is not None else 0.0)
                sequences.append((tokens, logprobs, "stop" if done.finish_reason == "stop" else "length"))
            self.futures.resolve(record, encode_sample(sequences, prompt))
        except TinkerError as err:
            self.futures.fail(record, err)
        except Exception as err:
            self.futures.fail(record, TinkerError(f"sampling failed: {type(err).__name__}: {err}", SERVER))
        finally:
            with self._lock:
                sampler.inflight -= 1
                drop = sampler.doomed and sampler.owner is not None and sampler.inflight == 0
            if drop:
                await asyncio.to_thread(self._drop, sampler.adapter)

    async def _sample(self, ids: list[int], adapter: Optional[str], params: list[SamplingParams]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in params]
        tickets = []
        try:
            for p, queue in zip(params, queues):
                tickets.append(self.server.scheduler.submit(Request(list(ids), adapter, p), LoopSink(loop, queue)))
        except QueueFull as err:
            for ticket in tickets:
                self.server.scheduler.cancel(ticket)
            raise TinkerError(f"the server is busy: {err}; retry later", SERVER) from None
        except WorkerDead as err:
            raise TinkerError(str(err), SERVER) from None
        results = []
        try:
            for queue in queues:
                while True:
                    item = await queue.get()
                    if isinstance(item, Completion):
                        results.append(item)
                        break
                    if isinstance(item, (AdapterUnloaded, Rejected)):
                        raise TinkerError(str(item), USER)
                    if isinstance(item, Exception):
                        raise TinkerError(f"sampling failed: {item}", SERVER)
        except BaseException:
            for ticket in tickets:
                self.server.scheduler.cancel(ticket)
            raise
        return results


@torch.no_grad()
def prompt_logprobs(model: torch.nn.Module, ids: list[int], adapter: Optional[str]) -> list[float]:
    """``log p(ids[i] | ids[:i])`` for every prompt position; NaN at position 0 (nothing before it)."""
    if len(ids) < 2:
        return [math.nan] * len(ids)
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    labels = tokens.clone()
    labels[0, 0] = IGNORE
    was_training = model.training
    model.eval()
    try:
        with route_adapters(model, [adapter]):
            values = token_logprobs(model, {"input_ids": tokens, "labels": labels,
                                            "attention_mask": torch.ones_like(tokens)})
    finally:
        model.train(was_training)
    return [math.nan] + values.float().cpu().tolist()
