"""Vectorised next-token choice for a batch whose rows each have their own sampling parameters.

Greedy, temperature, top-k and top-p rows are handled by the same few batched tensor operations;
the only per-row work is drawing each seeded row's uniform number from its own generator, so a
seeded row's sample depends on its logits and its seed, never on the rest of the batch. The
caller reads the chosen tokens and their log-probs back in one host synchronisation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class BatchParams:
    """Per-row sampling parameters as tensors, built once per batch composition.

    Args:
        temperature, top_p, top_k: one value per row (temperature 0 = greedy, top_k 0 = all).
        generators: one per row; None draws from the global RNG.
    """

    def __init__(self, temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int],
                 generators: Sequence[Optional[torch.Generator]], device: torch.device) -> None:
        self.greedy_all = all(t <= 0 for t in temperature)
        self.greedy = torch.tensor([t <= 0 for t in temperature], device=device)
        self.temperature = torch.tensor([t if t > 0 else 1.0 for t in temperature], dtype=torch.float32, device=device)
        self.top_p = torch.tensor(list(top_p), dtype=torch.float32, device=device)
        self.any_top_p = any(p < 1.0 for p in top_p)
        self.top_k = torch.tensor(list(top_k), dtype=torch.long, device=device)
        self.max_top_k = max(top_k, default=0)
        self.generators = list(generators)
        self.device = device

    def uniforms(self) -> torch.Tensor:
        """(rows,) uniform numbers in [0, 1): seeded rows from their own generator."""
        if all(g is None for g in self.generators):
            return torch.rand(len(self.generators), device=self.device)
        return torch.stack([torch.rand((), device=self.device, generator=g) for g in self.generators])


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
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p[:, None]
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    # Inverse-CDF sampling: the first token whose cumulative mass exceeds u * total.
    cdf = torch.cumsum(probs, dim=-1)
    target = params.uniforms()[:, None] * cdf[:, -1:]
    sampled = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=vocab - 1)
    tokens = torch.where(params.greedy, greedy, sampled)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]
