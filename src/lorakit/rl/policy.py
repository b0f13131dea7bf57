"""The trainer's side of the policy: the GRPO objective as a forward, log-prob passes, the reference.

The reference policy is no second model: it is the policy's base with every adapter disabled, or a
frozen adapter beside the trained one (a copy of the adapter training started from).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..lora import disable_adapters, set_active_adapters
from ..training import token_logprobs
from .grpo import LossStats, grpo_loss


class GRPOObjective:
    """The loss function for ``LossModule``: log-probs of the batch's completion tokens, and the GRPO loss.

    A batch with no ``advantages`` gives the (n,) log-probs (a no-grad pass for old or reference
    log-probs). A training batch carries ``advantages`` and ``weights`` (and ``old_logp`` after the
    first update of a step, ``ref_logp`` with a KL term), flat per token; the call returns the loss
    and keeps its statistics and the detached log-probs on ``stats`` and ``logp`` for the loop to read.
    """

    def __init__(self, temperature: float = 1.0, clip_low: float = 0.2, clip_high: float = 0.2,
                 beta: float = 0.0) -> None:
        self.temperature, self.clip_low, self.clip_high, self.beta = temperature, clip_low, clip_high, beta
        self.stats: Optional[LossStats] = None
        """The last training batch's statistics."""
        self.logp: Optional[torch.Tensor] = None
        """The last training batch's (n,) log-probs, detached."""

    @contextlib.contextmanager
    def at_temperature(self, temperature: float) -> Iterator[None]:
        """Compute log-probs at ``temperature`` in the block (1.0: the raw distribution, which rollout backends report)."""
        previous, self.temperature = self.temperature, temperature
        try:
            yield
        finally:
            self.temperature = previous

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logp = token_logprobs(model, batch, self.temperature)
        if "advantages" not in batch:
            return logp, int(logp.numel())
        old = batch.get("old_logp", logp.detach())  # on-policy: ratio 1, the plain policy gradient
        loss, stats = grpo_loss(logp, old, batch["advantages"], batch["weights"], self.clip_low, self.clip_high,
                                batch.get("ref_logp"), self.beta)
        self.stats, self.logp = stats, logp.detach()
        return loss, int(logp.numel())


@contextlib.contextmanager
def adapter_weights(params: Sequence[nn.Parameter], values: Optional[Sequence[torch.Tensor]]) -> Iterator[None]:
    """Run the block with ``params`` holding ``values`` (an earlier version of the adapter), then put
    their own values back; ``values`` None leaves them as they are.

    Args:
        params: the trained adapter's parameters (FSDP2: their local shards, as DTensors).
        values: one tensor per parameter, same shapes (a ``clone`` taken earlier).
    """
    if values is None:
        yield
        return
    with torch.no_grad():
        own = [p.detach().clone() for p in params]
        for param, value in zip(params, values):
            param.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, own):
                param.copy_(value)


def completion_logprobs(step_module: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                        autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """Per-token log-probs of the batches' completion tokens, with no grad.

    Args:
        step_module: a (wrapped) ``LossModule`` around a ``GRPOObjective``.
        batches: micro-batches without ``advantages``.
        autocast: a factory of the forward's autocast context.
    Returns:
        (n,) fp32 on the CPU, flat in batch and sequence order.
    """
    parts = []
    with torch.no_grad():
        for batch in batches:
            with autocast():
                logp, _ = step_module(batch)
            parts.append(logp.float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0)


@contextlib.contextmanager
def reference_policy(model: nn.Module, reference: Optional[str], policy: str) -> Iterator[None]:
    """Run the block under the reference policy, then make ``policy`` the active adapter again.

    Args:
        model: the policy model.
        reference: a frozen adapter's name, or None for the base model (every adapter disabled).
        policy: the trained adapter, active after the block (even when the block raises).
    """
    if reference is None:
        with disable_adapters(model):
            yield
        return
    set_active_adapters(model, [reference])
    try:
        yield
    finally:
        set_active_adapters(model, [policy])
