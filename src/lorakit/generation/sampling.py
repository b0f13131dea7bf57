"""Vectorised next-token choice for a batch whose rows each have their own sampling parameters.

Greedy, temperature, top-k and top-p rows are handled by the same few batched tensor operations,
seeded rows' random numbers included: a seeded row's uniform number at its n-th draw is a hash of
(seed, n) computed for every row at once in integer tensor ops (a counter-based generator, as
Philox is), so a seeded row's sample depends on its logits, its seed and how many tokens it has
drawn, never on the rest of the batch, and a step costs one launch however many rows are seeded
(a ``torch.Generator`` per row would cost one launch per row). The caller reads the chosen tokens
and their log-probs back in one host synchronisation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


_M31 = 0x7FFFFFFF  # hash state stays below 2**31, so products with the < 2**27 constants fit in int64


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A bijective integer mixer on [0, 2**31) (xor-shift / multiply rounds), elementwise."""
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & _M31
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & _M31
    return h ^ (h >> 16)


class SeedStream:
    """A seeded row's random stream: its seed and how many numbers it has drawn.

    Args:
        seed: any int (the request's ``seed``); bits past 62 are folded in.
    """

    def __init__(self, seed: int) -> None:
        self.keys = (seed & _M31, ((seed >> 31) ^ (seed >> 62)) & _M31)
        self.draws = 0


def seeded_uniforms(keys: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1) as a hash of each row's seed keys and draw counter.

    Args:
        keys: (rows, 2) int64, each in [0, 2**31) (``SeedStream.keys``).
        draws: (rows,) int64 draw counters, each in [0, 2**31).

    Returns:
        (rows,) float32, multiples of 2**-24 (exact in float32).
    """
    h = _mix((draws * 0x2545F49 + keys[:, 0]) & _M31)
    h = _mix(h ^ keys[:, 1])
    return (h >> 7).to(torch.float32) * (1.0 / (1 << 24))


class BatchParams:
    """Per-row sampling parameters as tensors, built once per batch composition.

    Args:
        temperature, top_p, top_k: one value per row (temperature 0 = greedy, top_k 0 = all).
        streams: one per row; None draws from the global RNG.
    """

    def __init__(self, temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int],
                 streams: Sequence[Optional[SeedStream]], device: torch.device) -> None:
        self.greedy_all = all(t <= 0 for t in temperature)
        self.greedy = torch.tensor([t <= 0 for t in temperature], device=device)
        self.temperature = torch.tensor([t if t > 0 else 1.0 for t in temperature], dtype=torch.float32, device=device)
        self.top_p = torch.tensor(list(top_p), dtype=torch.float32, device=device)
        self.any_top_p = any(p < 1.0 for p in top_p)
        self.top_k = torch.tensor(list(top_k), dtype=torch.long, device=device)
        self.max_top_k = max(top_k, default=0)
        self.streams = list(streams)
        self.device = device
        seeded = [s is not None for s in self.streams]
        self.all_seeded, self.any_seeded = all(seeded), any(seeded)
        self.seeded = torch.tensor(seeded, device=device)
        self.keys = torch.tensor([s.keys if s is not None else (0, 0) for s in self.streams], dtype=torch.long,
                                 device=device).reshape(len(self.streams), 2)
        self.draws = torch.tensor([s.draws if s is not None else 0 for s in self.streams], dtype=torch.long, device=device)

    def uniforms(self) -> torch.Tensor:
        """(rows,) uniform numbers in [0, 1): seeded rows from their own stream (then advanced)."""
        if not self.any_seeded:
            return torch.rand(len(self.streams), device=self.device)
        u = seeded_uniforms(self.keys, self.draws & _M31)
        self.draws += 1  # on the device: the next step needs no copy from the host
        for stream in self.streams:
            if stream is not None:
                stream.draws += 1  # the row's own count, for the next batch composition
        if self.all_seeded:
            return u
        return torch.where(self.seeded, u, torch.rand(len(self.streams), device=self.device))


def choose(logits: torch.Tensor, params: BatchParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each row's next token.

    Args:
        logits: (rows, vocab) next-token logits, any float dtype.
        params: the rows' sampling parameters.

    Returns:
        tokens (rows,) long and their log-probs (rows,) float32 under the raw model distribution
        (before temperature, top-k, top-p), both still on the logits' device.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = logits.argmax(dim=-1)
    if params.greedy_all:
        return greedy, logprobs.gather(1, greedy[:, None])[:, 0]
    scores = logits / params.temperature[:, None]
    vocab = scores.shape[-1]
    if params.max_top_k > 0:
        top = torch.topk(scores, min(params.max_top_k, vocab), dim=-1).values
        k = params.top_k.clamp(max=top.shape[-1])
        kth = top.gather(1, (k - 1).clamp(min=0)[:, None])
        kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))  # top_k 0: keep all
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.any_top_p:
        probs = _top_p(probs, params.top_p)
    # Inverse-CDF sampling: the first token whose cumulative mass exceeds u * total.
    cdf = torch.cumsum(probs, dim=-1)
    target = params.uniforms()[:, None] * cdf[:, -1:]
    sampled = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=vocab - 1)
    tokens = torch.where(params.greedy, greedy, sampled)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def _top_p(probs: torch.Tensor, top_p: torch.Tensor, first_k: int = 64) -> torch.Tensor:
    """Zero each row's tokens outside its nucleus: keep a token while the probability mass of the
    tokens before it (in descending order) is below ``top_p`` (the first token always stays).

    The nucleus is a prefix of the descending order, so once the ``k`` largest probabilities of
    every row with ``top_p < 1`` sum to at least its ``top_p``, they hold its whole nucleus: a top-k
    of growing k (64, then x8) finds it exactly without sorting the whole vocabulary, which is what
    the usual top-p (0.9-0.95 on a peaked distribution) needs. Costs one host sync per growth check.

    Args:
        probs: (rows, vocab) float32 probabilities.
        top_p: (rows,) float32; rows with ``top_p >= 1`` are returned unchanged.

    Returns:
        (rows, vocab) probabilities, unnormalised (the caller samples from the cumulative sum).
    """
    vocab = probs.shape[-1]
    filtered = top_p < 1.0
    k = min(first_k, vocab)
    while True:
        top, order = torch.topk(probs, k, dim=-1)  # sorted, descending
        cumulative = torch.cumsum(top, dim=-1)
        if k == vocab or bool(((cumulative[:, -1] >= top_p) | ~filtered).all()):
            break
        k = min(vocab, k * 8)
    drop = cumulative - top >= top_p[:, None]
    nucleus = torch.zeros_like(probs).scatter(1, order, top.masked_fill(drop, 0.0))
    return torch.where(filtered[:, None], nucleus, probs)
