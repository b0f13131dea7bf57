"""Token-level losses on given targets, and one forward/backward for several adapters' data at once.

This is the training side of a service that trains many users' LoRA adapters on one base (the
Tinker API in ``lorakit.serve.tinker``): each request brings its own rows, already shifted
(position ``i`` of a row predicts ``target_tokens[i]``), and a loss that is a *sum* over tokens:

* ``cross_entropy``: ``-sum(weights * logp)``;
* ``importance_sampling``: ``-sum(exp(logp - sampler_logp) * advantages)``;
* ``ppo``: ``-sum(min(r * A, clip(r, low, high) * A))`` with ``r = exp(logp - sampler_logp)``,
  ``low``/``high`` from the request's ``loss_fn_config`` (``clip_low_threshold``,
  ``clip_high_threshold``; default 0.8 and 1.2).

``forward_backward`` runs the rows of several requests, each routed to its own adapter, as one
batch through the model, each adapter's rows next to each other whatever order the requests
came in (``adapter_order``), so the LoRA layers run each adapter on a view of its block of rows.
The losses are sums and every adapter's parameters only see the rows routed to it, so each
adapter's gradient is what its request alone would give; gradients add up in ``.grad`` until
that adapter's optimizer steps (``AdapterOptimizer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ..data.tokenize import IGNORE
from ..lora import adapter_names, adapter_order, route_adapters
from .jobs import adapter_parameters
from .loss import token_logprobs

LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
}
"""The ``loss_fn_inputs`` each loss reads (all of a datum's length)."""

PPO_CLIP = (0.8, 1.2)
"""Default (low, high) bounds of the PPO ratio."""


@dataclass
class TokenDatum:
    """One row: model input tokens and the per-position loss inputs.

    Attributes:
        tokens: the N input token ids.
        inputs: (N,) tensors by name: ``target_tokens`` (long) and the loss's float inputs.
    """

    tokens: list[int]
    inputs: dict[str, torch.Tensor]


@dataclass
class LossRequest:
    """The rows of one adapter's forward(/backward) and the loss to take on them."""

    adapter: str
    data: list[TokenDatum]
    loss_fn: str
    config: Mapping[str, float] = field(default_factory=dict)


@dataclass
class LossResult:
    """What a request's rows gave: per-row log-probs of the targets and the summed loss."""

    logprobs: list[torch.Tensor]
    """(N,) float32 on the CPU, one per row: ``log p(target_tokens[i] | tokens[:i + 1])``."""
    loss: float
    """The request's summed loss."""


def check_loss(loss_fn: str, config: Mapping[str, float]) -> None:
    """Raise ValueError for an unknown loss or a config key the loss does not take."""
    if loss_fn not in LOSS_INPUTS:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; this server supports {sorted(LOSS_INPUTS)}")
    allowed = {"clip_low_threshold", "clip_high_threshold"} if loss_fn == "ppo" else set()
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"loss_fn_config key(s) {unknown} are not understood by {loss_fn!r}"
                         + (f" (it takes {sorted(allowed)})" if allowed else " (it takes none)"))
    if loss_fn == "ppo":
        low, high = ppo_bounds(config)
        if not 0 <= low <= 1 <= high:
            raise ValueError(f"ppo clip thresholds must satisfy 0 <= low <= 1 <= high, got low={low}, high={high}")


def ppo_bounds(config: Mapping[str, float]) -> tuple[float, float]:
    return float(config.get("clip_low_threshold", PPO_CLIP[0])), float(config.get("clip_high_threshold", PPO_CLIP[1]))


def token_loss(loss_fn: str, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
               config: Mapping[str, float]) -> torch.Tensor:
    """The summed loss of one row.

    Args:
        loss_fn: a key of ``LOSS_INPUTS``.
        logprobs: (N,) log-probs of the targets under the adapter being trained.
        inputs: the row's (N,) loss inputs (``weights``; or ``logprobs``, the sampler's, and ``advantages``).
        config: ``loss_fn_config`` (PPO's clip thresholds).

    Returns:
        A scalar fp32 tensor.
    """
    logprobs = logprobs.float()
    if loss_fn == "cross_entropy":
        return -(inputs["weights"].to(logprobs) * logprobs).sum()
    ratio = torch.exp(logprobs - inputs["logprobs"].to(logprobs))
    advantages = inputs["advantages"].to(logprobs)
    if loss_fn == "importance_sampling":
        return -(ratio * advantages).sum()
    if loss_fn == "ppo":
        low, high = ppo_bounds(config)
        return -torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages).sum()
    raise ValueError(f"unknown loss_fn {loss_fn!r}")


def forward_backward(model: nn.Module, requests: Sequence[LossRequest], pad_id: int,
                     backward: bool = True, group: bool = True) -> list[LossResult]:
    """Run every request's rows as one batch, each row through its request's adapter.

    Args:
        model: a HF causal LM holding the adapters (their parameters require grad for ``backward``).
        requests: one or more requests, of different adapters or the same, in any order.
        pad_id: the padding token (right padding; the attention mask hides it).
        backward: add each request's loss gradient to its adapter's ``.grad`` (else no graph is kept).
        group: put each adapter's rows next to each other in the batch (``adapter_order``): the
            LoRA layers then run each adapter on a view of its rows, with no per-row gather or
            scatter. False keeps the requests' order (the reference the grouped batch is tested against).

    Returns:
        One ``LossResult`` per request, in the caller's order, each row's log-probs in its order.
    """
    rows = [(index, datum) for index, request in enumerate(requests) for datum in request.data]
    if not rows:
        return [LossResult([], 0.0) for _ in requests]
    if group:  # a stable sort: a request's rows (one adapter) keep their order
        rows = [rows[i] for i in adapter_order([requests[index].adapter for index, _ in rows])]
    device = next(model.parameters()).device
    # One more column than the longest row: position i's target is the label at i + 1.
    width = max(len(datum.tokens) for _, datum in rows) + 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (_, datum) in enumerate(rows):
        n = len(datum.tokens)
        ids[r, :n] = torch.tensor(datum.tokens, dtype=torch.long)
        labels[r, 1:n + 1] = datum.inputs["target_tokens"].long()
        mask[r, :n] = 1
    batch = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
    names = [requests[index].adapter for index, _ in rows]
    with torch.set_grad_enabled(backward), route_adapters(model, names):
        flat = token_logprobs(model, batch)  # (sum of N,), row-major: each row's positions in order
        per_row = list(torch.split(flat, [len(datum.tokens) for _, datum in rows]))
        losses = [token_loss(requests[index].loss_fn, lp, datum.inputs, requests[index].config)
                  for (index, datum), lp in zip(rows, per_row)]
        if backward:
            torch.stack(losses).sum().backward()
    sums = [0.0] * len(requests)
    logprobs: list[list[torch.Tensor]] = [[] for _ in requests]
    values = torch.stack([loss.detach() for loss in losses]).tolist()  # one host sync for all rows
    for (index, _), lp, value in zip(rows, per_row, values):
        sums[index] += value
        logprobs[index].append(lp.detach().float().cpu())
    return [LossResult(lps, total) for lps, total in zip(logprobs, sums)]


@dataclass
class AdamStep:
    """One AdamW step's hyper-parameters (the Tinker API's ``AdamParams``)."""

    learning_rate: float = 1e-4
    """Step size."""
    beta1: float = 0.9
    """Decay of the gradient's running mean."""
    beta2: float = 0.95
    """Decay of the squared gradient's running mean."""
    eps: float = 1e-12
    """Added to the denominator."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    grad_clip_norm: float = 0.0
    """Clip this adapter's gradient to this global norm first; 0 = no clipping."""


class AdapterOptimizer:
    """AdamW over one adapter's parameters, stepped with per-step hyper-parameters.

    Args:
        model: the model holding the adapter.
        adapter: the adapter's name.
    """

    def __init__(self, model: nn.Module, adapter: str) -> None:
        if adapter not in adapter_names(model):
            raise ValueError(f"unknown adapter '{adapter}'")
        self.params = adapter_parameters(model, adapter)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def step(self, hp: AdamStep) -> dict[str, float]:
        """Apply the accumulated gradient, then clear it. Returns ``grad_norm`` (before clipping)."""
        if not (hp.learning_rate >= 0 and 0 <= hp.beta1 < 1 and 0 <= hp.beta2 < 1 and hp.eps >= 0
                and hp.weight_decay >= 0 and hp.grad_clip_norm >= 0):
            raise ValueError(f"invalid AdamW parameters {hp}: need learning_rate, eps, weight_decay, "
                             "grad_clip_norm >= 0 and 0 <= beta1, beta2 < 1")
        with_grad = [p for p in self.params if p.grad is not None]
        clip = hp.grad_clip_norm if hp.grad_clip_norm > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(with_grad, clip)) if with_grad else 0.0
        for group in self.optimizer.param_groups:
            group.update(lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer's moments and step counts as flat tensors (for a safetensors file)."""
        out: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self.params):
            state = self.optimizer.state.get(p)
            if not state:
                continue
            out[f"{i}.exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
            out[f"{i}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
            out[f"{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float64).reshape(1).cpu()
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` gave (the same adapter layout); checks every shape first."""
        for key, value in tensors.items():
            index, _, name = key.partition(".")
            if not index.isdigit() or int(index) >= len(self.params) or name not in ("exp_avg", "exp_avg_sq", "step"):
                raise ValueError(f"optimizer state key {key!r} does not fit this adapter ({len(self.params)} tensors)")
            if name != "step" and tuple(value.shape) != tuple(self.params[int(index)].shape):
                raise ValueError(f"optimizer state {key!r} has shape {tuple(value.shape)}, the adapter's tensor "
                                 f"{tuple(self.params[int(index)].shape)}")
        self.optimizer.state.clear()
        for i, p in enumerate(self.params):
            if f"{i}.exp_avg" not in tensors:
                continue
            self.optimizer.state[p] = {
                "step": torch.tensor(float(tensors[f"{i}.step"].reshape(-1)[0])),
                "exp_avg": tensors[f"{i}.exp_avg"].to(p.device, p.dtype).clone(),
                "exp_avg_sq": tensors[f"{i}.exp_avg_sq"].to(p.device, p.dtype).clone(),
            }


def check_datum(datum: TokenDatum, loss_fn: str, vocab_size: int, where: str,
                max_tokens: Optional[int] = None) -> None:
    """Raise ValueError (naming ``where``) if a row's inputs do not fit the loss or the vocabulary."""
    n = len(datum.tokens)
    if n == 0:
        raise ValueError(f"{where}: model_input is empty")
    if max_tokens is not None and n > max_tokens:
        raise ValueError(f"{where}: model_input has {n} tokens, more than this server's limit of {max_tokens}")
    bad = next((t for t in datum.tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{where}: model_input holds token id {bad}, outside the vocabulary (0 to {vocab_size - 1})")
    for key in LOSS_INPUTS[loss_fn]:
        value = datum.inputs.get(key)
        if value is None:
            raise ValueError(f"{where}: loss_fn_inputs lacks {key!r}, which {loss_fn!r} needs")
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(f"{where}: loss_fn_inputs[{key!r}] has shape {list(value.shape)}; it must be [{n}], "
                             "the model_input's length (targets are already shifted: position i predicts target i)")
        if key != "target_tokens" and not torch.isfinite(value).all():
            raise ValueError(f"{where}: loss_fn_inputs[{key!r}] holds a NaN or infinite value")
    targets = datum.inputs["target_tokens"]
    if targets.numel() and not ((targets >= 0) & (targets < vocab_size)).all():
        raise ValueError(f"{where}: target_tokens holds an id outside the vocabulary (0 to {vocab_size - 1})")
