"""PiSSA and OLoRA: start the adapter on the base weight's principal directions, keep the rest as base.

``init_lora_weights="pissa"`` takes the top-r singular triplets of the (out, in) base weight
``W = U S V^T``: ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T`` (s = the LoRA scale), so
``s * B @ A`` is W's best rank-r part. ``"pissa_niter_<N>"`` gets the triplets from
``torch.svd_lowrank`` with N subspace iterations (fast on large weights). ``"olora"`` uses the QR
decomposition ``W = Q R``: ``B = Q[:, :r]``, ``A = R[:r]``. Both then overwrite the base weight
with the residual ``W - s * B @ A`` (fp32 math), so the model's output does not change. This is
PEFT's arithmetic step for step, so the same base gives the same A, B and residual.

The trained adapter (A', B') only means something on that residual base. Since
``W_res + s B' A' = W + s (B' A' - B0 A0)``, the same model on the *untouched* base is the plain
LoRA of rank 2r with ``A = [A'; A0]`` and ``B = [B', -B0]`` (the scale kept: alpha doubles, or
grows by sqrt(2) with rsLoRA). That is what PEFT writes with
``save_pretrained(path_initial_model_for_weight_conversion=...)``, and what ``save_adapter`` writes
by default here: such an adapter serves on the original model (vLLM, PEFT, ``lorakit serve``),
and the initial A0, B0 are kept on each layer for it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from .config import LoraConfig, is_residual_init


__all__ = ["is_residual_init", "init_residual", "initial_weights", "restore_residual", "skip_draws", "to_plain_lora"]


def _weight_out_in(layer: nn.Module) -> torch.Tensor:
    from .quant import is_quantized

    if is_quantized(layer.base_layer):
        raise ValueError("init_lora_weights=pissa/olora rewrites the base weights and needs an unquantized base "
                         "(PEFT refuses it too); drop 'quantization' or use init_lora_weights: true")
    weight = layer.base_layer.weight.detach().float()
    return weight.T if layer.fan_in_fan_out else weight


def init_residual(layer: nn.Module, name: str, method: str) -> None:
    """Initialise adapter ``name`` of ``layer`` by PiSSA/OLoRA and make the base weight the residual."""
    r, scale = layer.r[name], layer.scaling[name]
    weight = _weight_out_in(layer)
    if method == "olora":
        q, rr = torch.linalg.qr(weight)
        b, a = q[:, :r], rr[:r]
    else:
        if method == "pissa":
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(weight, q=r, niter=int(method.rsplit("_", 1)[1]))
            vh = v.T
        root = torch.sqrt(s / scale)
        a = root[:, None] * vh
        b = u * root[None, :]
    a0 = a.to(layer.lora_A[name].weight.dtype).contiguous()
    b0 = b.to(layer.lora_B[name].weight.dtype).contiguous()
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(a0)
        layer.lora_B[name].weight.copy_(b0)
    restore_residual(layer, name, a0, b0, weight)


def skip_draws(layer: nn.Module, name: str, method: str) -> None:
    """Advance the global (CPU) random generator exactly as ``init_residual`` would on a CPU weight,
    without the weight: for a replay that defers ``init_residual`` until the base is readable (a
    sharded load), so the adapters initialised after it draw what a one-process run draws.

    Only ``pissa_niter_<N>`` draws: ``torch.svd_lowrank`` takes one ``(min(out, in), r)`` standard
    normal sketch. The caller checks the generator's state against the real call's.
    """
    if method.startswith("pissa_niter_"):
        torch.randn(min(layer.in_features, layer.out_features), layer.r[name], dtype=torch.float32)


def restore_residual(layer: nn.Module, name: str, a0: torch.Tensor, b0: torch.Tensor,
                     original: Optional[torch.Tensor] = None) -> None:
    """Write the residual ``W - s * b0 @ a0`` into the base and remember (a0, b0) for the conversion.

    Args:
        a0: (r, in) initial A; b0: (out, r) initial B.
        original: the untouched (out, in) fp32 base weight (default: the current base weight).
    """
    weight = _weight_out_in(layer) if original is None else original
    residual = weight - layer.scaling[name] * (b0.float() @ a0.float())
    base = layer.base_layer.weight
    with torch.no_grad():
        base.copy_((residual.T if layer.fan_in_fan_out else residual).to(base.dtype))
    layer.__dict__.setdefault("_initial_lora", {})[name] = (a0.detach().clone(), b0.detach().clone())


def initial_weights(layer: nn.Module, name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The (A0, B0) a PiSSA/OLoRA adapter started from on this layer, or None."""
    return layer.__dict__.get("_initial_lora", {}).get(name)


def to_plain_lora(config: LoraConfig, tensors: dict[str, torch.Tensor],
                  initial: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Convert a trained PiSSA/OLoRA adapter into plain LoRA for the original base.

    Args:
        config: the adapter's config (``init_lora_weights`` a residual init).
        tensors: its weights with PEFT keys (``...<path>.lora_A.weight``).
        initial: module path -> (A0, B0) as the training started.

    Returns:
        The rank-2r config (init True) and weights: ``A = [A'; A0]``, ``B = [B', -B0]``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for suffix, dim in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(suffix):
                path = key[: -len(suffix)].split(".", 2)[-1] if key.startswith("base_model.model.") else key[: -len(suffix)]
                a0, b0 = initial[path]
                other = a0 if dim == 0 else -b0
                value = torch.cat([value, other.to(value.device, value.dtype)], dim=dim)
        out[key] = value
    factor = 2.0 if not config.use_rslora else math.sqrt(2.0)
    converted = dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, alpha=config.alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )
    return converted, out
