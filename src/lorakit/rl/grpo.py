"""GRPO's math as pure functions: group advantages, token weights, the clipped ratio loss, k3 KL.

Shapes: B completions (``num_prompts x G``, grouped contiguously: completion i belongs to prompt
``i // G``), T completion tokens (right-padded, ``mask`` marks real tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages ``(r - mean_g) / (std_g + eps)`` within each group of ``group_size`` completions.

    Args:
        rewards: (B,) rewards, B a multiple of ``group_size``, groups contiguous.
        group_size: G, completions per prompt.
        scale: divide by the group's standard deviation (Bessel-corrected, as TRL); False gives
            Dr. GRPO's ``r - mean``.
        eps: keeps all-equal groups finite.

    Returns:
        (advantages (B,), zero_std (B // G,) bool: groups whose rewards are all equal, which get zero
        advantage and so teach nothing).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected a flat tensor of groups of {group_size}, got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    advantages = grouped - mean
    if scale:
        advantages = advantages / (std + eps)
    zero_std = (grouped == grouped[:, :1]).all(dim=1)
    # exactly zero (a float mean of equal rewards can miss them by an ulp): such groups teach nothing
    advantages = advantages.masked_fill(zero_std[:, None], 0.0)
    return advantages.view(-1), zero_std


def token_weights(mask: torch.Tensor, aggregation: Literal["token", "sequence"], num_tokens: float,
                  num_sequences: float) -> torch.Tensor:
    """Per-token weights that turn a sum of per-token losses into the aggregated mean.

    The totals cover the whole rollout mini-batch (all micro-batches on all ranks), so gradient
    accumulation and data parallelism give the same loss as one big batch.

    Args:
        mask: (B, T) 1 for completion tokens.
        aggregation: "token": every token of the mini-batch weighs the same (DAPO / Dr. GRPO);
            "sequence": each completion's mean, then the mean over completions (the GRPO paper).
        num_tokens: completion tokens in the mini-batch.
        num_sequences: completions in the mini-batch.
    Returns:
        (B, T) weights, 0 on padding.
    """
    mask = mask.float()
    if aggregation == "token":
        return mask / max(num_tokens, 1.0)
    if aggregation == "sequence":
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return mask / lengths / max(num_sequences, 1.0)
    raise ValueError(f"loss aggregation must be 'token' or 'sequence', got {aggregation!r}")


def trained_completions(finish_reasons: Sequence[str], mask_truncated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which completions the loss trains on, from how each one ended.

    'stop' (the model ended it) is trained; 'length' (cut at max_new_tokens) is trained unless
    ``mask_truncated``; 'abort' (the rollout backend gave up on the request: a vLLM abort, a server error
    mid-sequence) is never trained: its end is not the policy's doing, and counting it as a length
    cut would teach the policy from a sequence it did not finish.

    Args:
        finish_reasons: one per completion ('stop', 'length' or 'abort').
        mask_truncated: drop 'length' completions from the loss (``grpo.mask_truncated``).
    Returns:
        ``(keep, truncated, aborted)``, each (n,) bool.
    """
    truncated = torch.tensor([reason == "length" for reason in finish_reasons], dtype=torch.bool)
    aborted = torch.tensor([reason == "abort" for reason in finish_reasons], dtype=torch.bool)
    keep = ~aborted & ~truncated if mask_truncated else ~aborted
    return keep, truncated, aborted


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: ``e^(ref - p) - (ref - p) - 1`` (>= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


@dataclass
class LossStats:
    """Sums over the micro-batch's completion tokens (divide by the token count for means)."""

    clipped: float
    """Tokens where the clipped objective was the one taken (ratio outside the trust region on the
    side the advantage pushes toward)."""
    clipped_low: float
    clipped_high: float
    kl: float
    """Sum of k3 KL over tokens (0 without a reference)."""
    ratio: float
    """Sum of the probability ratios."""
    tokens: float


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
              clip_low: float = 0.2, clip_high: float = 0.2, ref_logp: Optional[torch.Tensor] = None,
              beta: float = 0.0) -> tuple[torch.Tensor, LossStats]:
    """The PPO-clipped GRPO objective, negated for minimisation, with an optional k3 KL penalty.

    Per token: ``-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * KL`` with
    ``ratio = exp(logp - old_logp)``; the loss is ``sum(weights * per_token)``.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logp: (B, T) the same under the policy that sampled them (no grad).
        advantages: (B,) one advantage per completion, or one per token (the shape of ``logp``).
        weights: (B, T) from ``token_weights`` (0 on padding).
        clip_low, clip_high: the trust region ``[1 - clip_low, 1 + clip_high]`` (DAPO's clip-higher
            when clip_high > clip_low).
        ref_logp: (B, T) reference log-probs, needed when beta > 0.
        beta: KL coefficient.
    Returns:
        (scalar loss, statistics).
    """
    mask = weights > 0
    adv = advantages.float()
    if adv.dim() < logp.dim():
        adv = adv[:, None]
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if beta:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp.detach())
        per_token = per_token + beta * kl
    elif ref_logp is not None:
        kl = kl_k3(logp.detach(), ref_logp.detach())
    loss = (weights * per_token).sum()
    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (adv < 0) & mask
        high = (ratio > 1.0 + clip_high) & (adv > 0) & mask
        stats = LossStats(
            clipped=float((low | high).sum()), clipped_low=float(low.sum()), clipped_high=float(high.sum()),
            kl=float((kl * mask).sum()), ratio=float((ratio * mask).sum()), tokens=float(mask.sum()),
        )
    return loss, stats
