"""The optimizer every recipe builds: AdamW over the trainable parameters, with LoRA+ groups on request.

LoRA+ (Hayou et al., 2024) trains B with a larger learning rate than A: ``lr_B = ratio * lr_A``.
The grouping follows PEFT's ``create_loraplus_optimizer`` so that a run here and a PEFT run with the
same ratio update the same parameters at the same rates:

- parameters of a LoRA *embedding* layer get PEFT's embedding learning rate (1e-6 by default);
- ``lora_B`` weights and every other 1-D trainable parameter (DoRA's magnitude, a trained bias)
  get ``ratio * lr`` (biases and norm weights without weight decay, as PEFT does);
- everything else (``lora_A``, ``modules_to_save`` matrices) gets ``lr``.

Each group carries ``lr_scale`` (its learning rate over the base one), so the schedule sets
``group["lr"] = lr(step) * lr_scale`` and the ratio survives in a checkpoint's optimizer state.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..lora import LoraEmbedding, lora_modules, unwrap_model

LORAPLUS_LR_EMBEDDING = 1e-6
"""PEFT's default learning rate for LoRA on embedding layers under LoRA+."""


def _no_decay(name: str, module: nn.Module) -> bool:
    return name.endswith("bias") or isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: Optional[float],
                 loraplus_lr_embedding: float = LORAPLUS_LR_EMBEDDING) -> list[dict]:
    """The trainable parameters of ``model`` in optimizer groups.

    Args:
        model: a model with LoRA layers (possibly wrapped by DDP/FSDP2).
        lr: the base learning rate (A's).
        weight_decay: AdamW weight decay.
        loraplus_lr_ratio: None for plain LoRA (one group), else B's lr over A's.
        loraplus_lr_embedding: LoRA+ learning rate for parameters of LoRA embedding layers.

    Returns:
        Groups with ``params``, ``lr``, ``weight_decay``, ``lr_scale`` and a ``name``; empty groups
        are left out.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if loraplus_lr_ratio is None:
        return [{"name": "all", "params": [p for _, p in named], "lr": lr, "weight_decay": weight_decay, "lr_scale": 1.0}]
    root = unwrap_model(model)
    owner: dict[int, nn.Module] = {}  # parameter -> the module that holds it directly
    for module in root.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    # Only an embedding's A and B: PEFT groups its DoRA magnitude (1-D) with B, like every magnitude.
    embedding_params = {id(p) for _, layer in lora_modules(root) if isinstance(layer, LoraEmbedding)
                        for store in (layer.lora_embedding_A, layer.lora_embedding_B) for p in store.values()}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in named:
        if id(p) in embedding_params:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            no_decay = _no_decay(name, owner.get(id(p), root))
            groups["B_no_decay" if no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    scale = {"A": 1.0, "embedding": loraplus_lr_embedding / lr, "B": loraplus_lr_ratio, "B_no_decay": loraplus_lr_ratio}
    return [{"name": key, "params": ps, "lr": lr * scale[key], "lr_scale": scale[key],
             "weight_decay": 0.0 if key == "B_no_decay" else weight_decay}
            for key, ps in groups.items() if ps]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                    loraplus_lr_ratio: Optional[float] = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``model`` (LoRA+ groups when a ratio is given)."""
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, loraplus_lr_ratio), lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled learning rate: each group gets ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
