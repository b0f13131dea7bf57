"""Putting an adapter into a model: wrap the planned targets, register the config, set what trains.

What gets wrapped is decided in ``targets`` (PEFT's target rule); this module carries the plan out.
The names that lived here before the split (adapter state, trainable report, target matching, the
module-tree helpers) are re-exported, so ``from lorakit.lora.inject import ...`` keeps working.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .experts import LoraParameter, general_name
from .layer import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from .state import (
    RowRouting,
    active_adapters,
    adapter_names,
    adapter_order,
    delete_adapter,
    disable_adapters,
    route_adapters,
    set_active_adapters,
)
from .targets import Target, check_variant_target, is_target, plan_injection, resolve_all_linear
from .trainable import TrainableReport, mark_trainable, set_adapter_trainable, trainable_report
from .tree import _replace, adapter_configs, iter_modules, lora_modules, unwrap_model

__all__ = [
    "inject_lora",
    # Re-exported from their homes since the split (state, targets, trainable, tree).
    "RowRouting", "Target", "TrainableReport", "active_adapters", "adapter_configs", "adapter_names", "adapter_order",
    "check_variant_target", "delete_adapter", "disable_adapters", "is_target", "iter_modules", "lora_modules",
    "mark_trainable", "plan_injection", "resolve_all_linear", "route_adapters", "set_active_adapters",
    "set_adapter_trainable", "trainable_report", "unwrap_model",
]


def _adapter_dtype(weight: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    if not weight.dtype.is_floating_point:  # quantized codes (bitsandbytes): train the adapter in fp32
        return torch.float32
    # Half-precision bases get float32 adapters: small updates to B survive the optimizer step.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def inject_lora(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    dtype: Optional[torch.dtype] = None,
    trainable: bool = True,
) -> list[str]:
    """Wrap the modules ``config`` targets with LoRA adapter ``adapter_name``, in place.

    Afterwards it is the one active adapter, and gradients follow :func:`set_adapter_trainable`:
    the base is frozen, this adapter's parameters (LoRA A/B and its ``modules_to_save`` copies)
    require grad iff ``trainable``, and other adapters keep whatever they had.

    Args:
        model: any ``nn.Module``; its submodules are replaced, the root is kept.
        config: the adapter's hyper-parameters.
        adapter_name: name of the new adapter (several can live in one model).
        dtype: dtype of the adapter weights; default: the base's, or float32 for fp16/bf16 bases.
        trainable: False freezes this adapter (for inference, or an RL reference) and leaves
            an adapter being trained training.

    Returns:
        The paths of the wrapped modules, in model order.
    """
    model = unwrap_model(model)
    targets, saved = plan_injection(model, config, adapter_name)
    expert_targets = [t.path for t in targets if t.param is not None]
    if config.use_dora and expert_targets:
        # DoRA's per-output-feature norm is defined for Linear/Conv1D weights; PEFT has no DoRA for
        # parameter targets either.
        raise ValueError(f"use_dora: '{expert_targets[0]}' is a fused expert weight (target_parameters, or all-linear "
                         "on an MoE model), which DoRA does not cover: set target_parameters: [] or use_dora: false")
    fan_in_fan_out = False
    _wrap_parameters(model, [t for t in targets if t.param is not None], adapter_name, config, dtype)
    for t in targets:
        if t.param is not None:
            continue
        layer = t.module
        if not isinstance(layer, LoraLayer):
            layer = LoraEmbedding(t.module) if isinstance(t.module, nn.Embedding) else LoraLinear(t.module)
            _replace(model, t.path, layer)
        fan_in_fan_out |= getattr(layer, "fan_in_fan_out", False)
        layer.add_adapter(
            adapter_name, t.r, t.alpha, config.dropout, config.use_rslora, config.init_lora_weights,
            dtype=_adapter_dtype(layer.base_layer.weight, dtype), use_dora=config.use_dora,
        )
    for path, module in saved:
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _replace(model, path, module)
        module.add_adapter(adapter_name)

    stored = config
    if config.target_modules == ALL_LINEAR:
        # Saved configs name the layers, as PEFT writes them, so every reader wraps the same ones.
        stored = dataclasses.replace(config, target_modules=resolve_all_linear(model))
        if config.target_parameters is None:
            found = sorted({f"{t.path.split('.base_layer')[0]}.{t.param}" for t in targets if t.param})
            stored = dataclasses.replace(stored, target_parameters=_general(found) or None)
    if fan_in_fan_out:
        stored = dataclasses.replace(stored, fan_in_fan_out=True)
    adapter_configs(model)[adapter_name] = stored
    set_active_adapters(model, [adapter_name])
    set_adapter_trainable(model, adapter_name, trainable)
    return [t.path for t in targets]


def _general(paths: list[str]) -> list[str]:
    return sorted({general_name(p) for p in paths})


def _wrap_parameters(model: nn.Module, targets: list[Target], adapter_name: str, config: LoraConfig,
                     dtype: Optional[torch.dtype]) -> None:
    # One chain of wrappers per owner module, built in the owner's registration order (PEFT's nesting).
    owners = {t.path: t.module.owner if isinstance(t.module, LoraParameter) else t.module for t in targets}
    fused = [t for t in targets if getattr(getattr(owners[t.path], t.param, None), "dim", lambda: 0)() == 3]
    if fused and getattr(model, "use_kernels", False):
        # Hub kernels replace whole MoE blocks (gpt-oss's MegaBlocks) and read the expert weights directly.
        raise ValueError(
            f"target_parameters '{fused[0].path}.{fused[0].param}': the model runs hub kernels (use_kernels=True), "
            "which compute MoE blocks from the base weights and would skip the LoRA on them; load the model "
            "without use_kernels, or leave the experts out (target_parameters: [])"
        )
    chains: dict[str, LoraParameter] = {}
    for t in targets:
        owner_path = t.path.split(".base_layer")[0]
        if owner_path in chains:
            continue
        outer = t.module
        if not isinstance(outer, LoraParameter):
            for param in [x.param for x in targets if x.path.split(".base_layer")[0] == owner_path]:
                outer = LoraParameter(outer, param, f"{owner_path}.{param}")
            _replace(model, owner_path, outer)
        chains[owner_path] = outer
    for t in targets:
        wrapper = next(w for w in chains[t.path.split(".base_layer")[0]]._chain() if w.param_name == t.param)
        wrapper.add_adapter(adapter_name, t.r, t.alpha, config.dropout, config.use_rslora, config.init_lora_weights,
                            dtype=_adapter_dtype(wrapper._base_weight(), dtype))
