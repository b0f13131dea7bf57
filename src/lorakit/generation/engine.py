"""Batched sampling with a KV cache, where every row may use its own adapter (or the base).

One prefill and one decode step per token for the whole batch, whatever mix of adapters it holds:
the LoRA layers route rows to their adapters (``route_adapters``). The engine knows nothing of
HTTP; the server and the RL recipe both drive it. Adapter weights can be replaced in place between
calls (``update_adapter``): no reload from disk, no new modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..data.tokenize import collect_eos_ids
from ..lora import adapter_names, route_adapters, set_adapter_weights


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
    text: str
    token_id: Optional[int]
    logprob: Optional[float]
    finish_reason: Optional[str] = None


class _Row:
    """Decoding state of one request."""

    def __init__(self, request: Request, tokenizer: Any, eos: set[int], device: torch.device) -> None:
        self.request, self.tokenizer, self.eos = request, tokenizer, eos
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.emitted = 0  # characters of text already streamed
        self.text = ""
        self.finish: Optional[str] = None
        self.stop_token: Optional[int] = None
        self.stop_logprob: Optional[float] = None
        seed = request.params.seed
        self.generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        # Held back while streaming: a stop string may still be completing.
        self.holdback = max((len(s) for s in request.params.stop), default=1) - 1

    def push(self, token: int, logprob: float) -> Delta:
        params = self.request.params
        if token in self.eos and not params.ignore_eos:
            self.finish = "stop"
            self.stop_token, self.stop_logprob = token, logprob
            return Delta(0, self._flush(), None, None, self.finish)
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in params.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.finish = "stop"
        if self.finish is None and len(self.tokens) >= params.max_new_tokens:
            self.finish = "length"
        if self.finish is not None:
            return Delta(0, self._flush(), token, logprob, self.finish)
        # A byte-level token may end mid-character ("\ufffd"): wait for the rest of it.
        safe = len(self.text) - self.holdback
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted += len(delta)
        return Delta(0, delta, token, logprob)

    def _flush(self) -> str:
        rest = self.text[self.emitted:]
        self.emitted = len(self.text)
        return rest


def _choose(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """Pick the next token from one row's fp32 logits (vocab,)."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token while the mass before it is below top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """Generate for a batch of requests, each with its own adapter and sampling parameters."""

    def __init__(self, model: Any, tokenizer: Any, lockstep: Optional[Callable[[bool], bool]] = None) -> None:
        """
        Args:
            model: a HF causal LM (with LoRA layers for per-row adapters).
            tokenizer: its tokenizer (eos / pad ids, decoding).
            lockstep: for a model whose forward is a collective (FSDP2-sharded weights: every
                forward gathers parameters from all ranks), so every rank must run the same number
                of forwards. Contract: the engine calls ``lockstep(busy)`` exactly once after each
                forward's tokens are taken (the prefill, then every decode step), with ``busy`` =
                "this rank still has unfinished rows", and ``lockstep`` returns "some rank still has
                unfinished rows" (an all-reduce, so it is itself a collective, called the same number
                of times on every rank). While it returns True the engine runs another decode forward
                even when all its own rows are finished (they are fed the pad token and their
                output is discarded: a dummy forward); when it returns False the batch ends, on all
                ranks at the same step. A ``generate``/``stream`` call with no requests runs one
                dummy row (one pad-token prompt) under the same protocol and returns nothing, so a
                rank with nothing to sample still joins the others' forwards. Callers that split
                work into several ``generate`` calls must agree on the number of calls across ranks
                themselves (e.g. with the same ``lockstep`` function). None: no collective, the
                batch ends when its own rows do.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.lockstep = lockstep
        eos = set(collect_eos_ids(tokenizer, getattr(model, "generation_config", None)))
        self.eos = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def adapters(self) -> list[str]:
        return adapter_names(self.model)

    def update_adapter(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Replace adapter ``name``'s weights in place (keys as ``adapter_state_dict`` gives them)."""
        set_adapter_weights(self.model, tensors, name)

    def generate(self, requests: Sequence[Request], on_delta: Optional[Callable[[list[Delta]], None]] = None) -> list[Completion]:
        """Run ``requests`` to completion as one batch; ``on_delta`` sees each step's new text."""
        rows: list[Optional[_Row]] = [None] * len(requests)
        for deltas in self._run(requests, rows):
            if on_delta is not None:
                on_delta(deltas)
        return [Completion(r.tokens, r.text, r.logprobs, r.finish or "length", len(q.prompt_ids), r.stop_token,
                           r.stop_logprob) for r, q in zip(rows, requests)]

    def stream(self, requests: Sequence[Request]) -> Iterator[list[Delta]]:
        """Yield, after each decode step, the new text of every row that produced some."""
        rows: list[Optional[_Row]] = [None] * len(requests)
        yield from self._run(requests, rows)

    @torch.no_grad()
    def _run(self, requests: Sequence[Request], rows: list[Optional[_Row]]) -> Iterator[list[Delta]]:
        if not requests:
            if self.lockstep is not None:  # nothing to sample here, but the others' forwards need this rank
                dummy = [Request([self.pad_id], None, SamplingParams(max_new_tokens=1))]
                for _ in self._run(dummy, [None]):
                    pass
            return
        known = set(self.adapters())
        for req in requests:
            if req.adapter is not None and req.adapter not in known:
                raise ValueError(f"unknown adapter '{req.adapter}'; loaded: {sorted(known)}")
            if not req.prompt_ids:
                raise ValueError("empty prompt")
        device = self.device
        for i, req in enumerate(requests):
            rows[i] = _Row(req, self.tokenizer, self.eos, device)
            if req.params.max_new_tokens <= 0:
                rows[i].finish = "length"  # nothing to sample
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, req in enumerate(requests):  # left padding: every row's next token sits in the last column
            ids[i, width - len(req.prompt_ids):] = torch.tensor(req.prompt_ids)
            mask[i, width - len(req.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        was_training = self.model.training
        self.model.eval()
        try:
            with route_adapters(self.model, [r.adapter for r in requests]):
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    past_key_values=cache, use_cache=True).logits[:, -1]
                while True:  # each row finishes by itself ('length' at its max_new_tokens at the latest)
                    logprobs = torch.log_softmax(logits.float(), dim=-1)
                    next_ids = []
                    deltas = []
                    for i, row in enumerate(rows):
                        if row.finish is not None:
                            next_ids.append(self.pad_id)
                            continue
                        token = _choose(logits[i].float(), row.request.params, row.generator)
                        delta = row.push(token, float(logprobs[i, token]))
                        delta.row = i
                        if delta.text or delta.finish_reason:
                            deltas.append(delta)
                        next_ids.append(token)
                    if deltas:
                        yield deltas
                    busy = any(r.finish is None for r in rows)
                    if self.lockstep is not None:
                        busy = self.lockstep(busy)
                    if not busy:
                        return
                    step = torch.tensor(next_ids, device=device)[:, None]
                    mask = torch.cat([mask, torch.ones_like(step)], dim=1)
                    positions = positions[:, -1:] + 1
                    logits = self.model(input_ids=step, attention_mask=mask, position_ids=positions,
                                        past_key_values=cache, use_cache=True).logits[:, -1]
        finally:
            self.model.train(was_training)
