"""DoRA: weight-decomposed LoRA (Liu et al., 2024), with PEFT's math and key names.

The adapted weight is ``W' = m * (W + s*B@A) / ||W + s*B@A||`` with one norm per output feature
(a row of the (out, in) weight) and a trained magnitude ``m`` (PEFT's ``lora_magnitude_vector``,
initialised to that norm, so a fresh adapter changes nothing). As in PEFT and the paper, the norm is
treated as a constant in the backward pass. With ``f = m / norm`` the layer output is::

    y = base(x) + (f - 1) * (W x) + f * s * B(A(dropout(x)))

which PEFT computes the same way (``W x`` is the base output without its bias; when dropout is
active PEFT uses ``W dropout(x)``, and so does this module).

Cost: the norm is never built from a full ``W + s*B@A`` temporary. Expanding the square,

    ||W_i + s*(B A)_i||^2 = ||W_i||^2 + 2s * <B_i, (W A^T)_i> + s^2 * B_i (A A^T) B_i^T

needs the per-row ``||W_i||^2`` (cached: the base is frozen, and the cache is keyed on the layer's
``generation``, which merges, base swaps and reloads bump, so a gathered FSDP2 weight that moves
every micro-batch is not read again), ``W A^T`` (one (r, in) x (in, out) product, run through the base layer itself,
so a quantized base is never dequantized per step) and the (r, r) Gram matrix of A. In eval mode the
whole norm is cached until A, B or the base change.

Embeddings (PEFT's layout too): the (num_embeddings, dim) table is read as the (dim, num_embeddings)
weight of a Linear from one-hot ids, so A = ``lora_embedding_A`` (r, num), B = ``lora_embedding_B``
(dim, r), and the magnitude and norm are per embedding dimension, (dim,): a column norm of the table,
taken over the whole vocabulary. There is no bias and no dropout, so ``y = f * (base(ids) + s * A^T[ids] @ B^T)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .quant import compute_dtype, dequantized_weight, is_quantized



def _key(layer: nn.Module, *tensors: torch.Tensor) -> tuple[Any, ...]:
    """What a cache built from ``tensors`` of ``layer`` is valid for: the layer's generation (tensors
    replaced, base rewritten) and the tensors' in-place versions (an optimizer step)."""
    return (layer.generation, *(t._version for t in tensors))


def _transposed(layer: nn.Module) -> bool:
    """Whether the base weight is stored (in, out): GPT-2 Conv1D, and an embedding table (num, dim)."""
    return isinstance(layer.base_layer, nn.Embedding) or bool(getattr(layer, "fan_in_fan_out", False))


def _factors(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's live ``(A, B)`` as (r, in) and (out, r), ``out`` being the magnitude's dimension."""
    if isinstance(layer.base_layer, nn.Embedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def base_weight_fp32(layer: nn.Module) -> torch.Tensor:
    """The base weight as a float32 (out, in) matrix (a quantized base is dequantized)."""
    weight = dequantized_weight(layer.base_layer).float()
    return weight.T if _transposed(layer) else weight


def _base_row_norms_sq(layer: nn.Module) -> torch.Tensor:
    """``||W_i||^2`` per output feature, float32 (out,), cached while the base is unchanged (the base is
    frozen: only the layer's ``generation`` says it changed; its storage and version move under FSDP2)."""
    key = _key(layer)
    cached = layer.__dict__.get("_dora_base_sq")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, base_weight_fp32(layer).pow(2).sum(dim=1))
        layer.__dict__["_dora_base_sq"] = cached
    return cached[1]


def _base_matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` without the bias: the base layer's own product (quantized kernels included)."""
    base = layer.base_layer
    if type(base) is nn.Linear:
        return F.linear(x.to(base.weight.dtype), base.weight)
    if _transposed(layer) and not is_quantized(base):  # Conv1D / embedding: weight (in, out)
        return x.to(base.weight.dtype) @ base.weight
    out = base(x.to(compute_dtype(base)))
    bias = getattr(base, "bias", None)
    return out - bias if bias is not None else out


def weight_norm(layer: nn.Module, name: str) -> torch.Tensor:
    """``||W + s*B@A||`` per output feature, float32 (out,), without gradient (see the module doc)."""
    a, b = _factors(layer, name)
    scale = layer.scaling[name]
    key = (_key(layer, a, b), scale)
    if not layer.training:
        cached = layer.__dict__.get("_dora_norm", {}).get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
    with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
        a32, b32 = a.float(), b.float()
        w_at = _base_matmul(layer, a32).float().T  # (out, r) = W A^T
        cross = (b32 * w_at).sum(dim=1)
        lora_sq = ((b32 @ (a32 @ a32.T)) * b32).sum(dim=1)
        norm = (_base_row_norms_sq(layer) + 2.0 * scale * cross + scale * scale * lora_sq).clamp_min(0.0).sqrt()
    if not layer.training:
        layer.__dict__.setdefault("_dora_norm", {})[name] = (key, norm)
    return norm


def init_magnitude(layer: nn.Module, name: str) -> None:
    """Set the magnitude to the current ``||W + s*B@A||`` (PEFT's DoRA initialisation)."""
    with torch.no_grad():
        layer.lora_magnitude_vector[name].copy_(weight_norm(layer, name))


def dora_delta(layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, name: str) -> torch.Tensor:
    """What DoRA adds to the base output ``base_out`` (= base(x), bias included) for input ``x``.

    Args:
        x: (..., in_features).
        base_out: (..., out_features), the base layer's output for ``x``.

    Returns:
        (..., out_features) in the adapter's dtype.
    """
    magnitude = layer.lora_magnitude_vector[name]
    if isinstance(layer.base_layer, nn.Embedding):  # x: ids; no dropout on ids, no bias
        factor = magnitude / weight_norm(layer, name).to(magnitude.dtype)  # (dim,)
        lora = layer._delta(x, name)  # (..., dim), scaled
        return torch.addcmul(base_out.to(lora.dtype) * (factor - 1), lora, factor)
    a = layer.lora_A[name].weight
    b = layer.lora_B[name].weight
    scale = layer.scaling[name]
    dropout = layer.lora_dropout[name]
    factor = magnitude / weight_norm(layer, name).to(magnitude.dtype)  # (out,): gradient flows to m only
    x_in = dropout(x)
    # The scale goes on the (..., r) intermediate, cheaper than on the (..., out) result.
    lora = F.linear(F.linear(x_in.to(a.dtype), a) * scale, b)
    if isinstance(dropout, nn.Identity) or not layer.training:
        bias = getattr(layer.base_layer, "bias", None)
        plain = base_out - bias if bias is not None else base_out
    else:  # dropout changed the input: W x must see the same input as the LoRA branch (as in PEFT)
        plain = _base_matmul(layer, x_in)
    return torch.addcmul(plain.to(lora.dtype) * (factor - 1), lora, factor)


def merge_weight(layer: nn.Module, value: torch.Tensor, name: str, sign: float) -> torch.Tensor:
    """Merge (sign > 0) or unmerge (sign < 0) a DoRA adapter into/out of ``value`` (fp32, base layout).

    Merging stores the norm it divided by, so unmerging inverts it exactly (up to fp32 rounding).
    """
    delta = layer.delta_weight(name)
    magnitude = layer.lora_magnitude_vector[name].detach().float()
    stored = layer.__dict__.setdefault("_dora_merge_norm", {})
    dim = 0 if _transposed(layer) else 1  # the output feature is a column of a Conv1D weight / embedding table
    shape = (1, -1) if _transposed(layer) else (-1, 1)
    if sign > 0:
        combined = value + delta
        norm = torch.linalg.vector_norm(combined, dim=dim)
        stored[name] = norm
        return combined * (magnitude / norm).view(shape)
    norm = stored.pop(name, None)
    if norm is None:
        raise RuntimeError(f"DoRA adapter '{name}' has no record of its merge; it cannot be unmerged")
    return value / (magnitude / norm).view(shape) - delta


def unmerged_output(layer: nn.Module, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """The output ``result`` of a layer whose weight holds merged DoRA adapter ``name``, with it taken out.

    The merged weight is ``f * (W + delta)`` with ``f = m / norm`` (the norm stored at merge time),
    so ``W x = (result - bias) / f - delta x``; only the output changes, never the weight.

    Args:
        result: (..., out_features), the base layer's output on the merged weight.
        x: the layer's input, (..., in_features) or ids.

    Returns:
        (..., out_features) in float32.
    """
    norm = layer.__dict__.get("_dora_merge_norm", {}).get(name)
    if norm is None:
        raise RuntimeError(f"DoRA adapter '{name}' has no record of its merge; it cannot be taken out of the output")
    factor = layer.lora_magnitude_vector[name].detach().float() / norm
    bias = getattr(layer.base_layer, "bias", None)
    plain = result.float() if bias is None else result.float() - bias.detach().float()
    out = plain / factor - layer._merged_delta(x, name).float()
    return out if bias is None else out + bias.detach().float()
