"""Merging adapters into base weights and taking LoRA out of a model."""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .layer import LoraLayer
from .quant import quantization_of
from .state import adapter_names
from .tree import _replace, adapter_configs, lora_modules, unwrap_model


def merge_lora(model: nn.Module, adapter_names_: Optional[Sequence[str]] = None) -> list[str]:
    """Add adapters' updates into the base weights: ``W += scale * B @ A`` (fp32 math, cast back).

    Merged adapters are skipped by the forward pass, so outputs stay the same but LoRA costs
    nothing at inference. Merging an already merged adapter does nothing.

    Args:
        model: a model with LoRA layers.
        adapter_names_: adapters to merge; default: the active ones.

    Returns:
        The paths of the layers whose weights changed.

    Raises:
        ValueError: an unknown adapter, or a merge that would put NaN/Inf into a weight; in that
            case no weight of the model has changed.
    """
    if adapter_names_ is not None:
        known = adapter_names(model)
        unknown = [n for n in adapter_names_ if n not in known]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; the model has {known}")
    plan: list[tuple[str, LoraLayer, list[str]]] = []
    for path, layer in lora_modules(model):
        if not isinstance(layer, LoraLayer):
            continue
        wanted = layer.active_adapters if adapter_names_ is None else adapter_names_
        todo = [n for n in wanted if n in layer.r and n not in layer.merged_adapters]
        if todo:
            plan.append((path, layer, todo))

    # Check every layer before writing any, so a bad adapter leaves the model untouched.
    uses = Counter(id(p) for _, p in unwrap_model(model).named_parameters(remove_duplicate=False))
    for path, layer, todo in plan:
        kind = quantization_of(layer.base_layer)
        if kind is not None:
            raise ValueError(f"cannot merge into '{path}': its base is quantized ({kind}); dequantize the model first "
                             "(lorakit.lora.quant.dequantize_model, as `lorakit merge` does); no weight was changed")
        if uses[id(layer._base_weight())] > 1:
            raise ValueError(
                f"cannot merge into '{path}': its weight is shared with another module (tied embeddings?), "
                "which the merge would change too; no weight was changed"
            )
        merged = _merged(layer, todo)
        if not torch.isfinite(merged.to(layer._base_weight().dtype)).all():
            raise ValueError(
                f"merging adapter(s) {todo} into '{path}' would produce NaN/Inf "
                f"(in {layer._base_weight().dtype}); no weight was changed"
            )
    for _, layer, todo in plan:
        value = _merged(layer, todo)
        for name in todo:
            layer.merged_adapters.append(name)
        layer.write_base_weight(value)
    return [path for path, _, _ in plan]


def _merged(layer: LoraLayer, names: Sequence[str], sign: float = 1.0) -> torch.Tensor:
    value = layer._base_weight().detach().float()
    for name in names:
        value = layer.merge_weight(value, name, sign)
    return value


def merged_weights(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Each adapted layer's base weight with ``adapter_name`` merged in, computed aside (the model is
    not changed): what an inference server (vLLM) that cannot run LoRA loads in place of its own weights.

    Holds every merged layer at once; a server that loads weights one by one takes
    :func:`iter_merged_weights` instead.

    Returns:
        ``{"<module path>.weight": fp32 tensor}`` (``"<module path>.<parameter>"`` for a
        ``target_parameters`` weight such as ``mlp.experts.gate_up_proj``), keyed like the base
        model's state dict, shaped like the base weight (a sharded weight is gathered whole: every
        rank must call this under FSDP2).
    """
    return dict(iter_merged_weights(model, adapter_name))


def iter_merged_weights(model: nn.Module, adapter_name: str = "default",
                        dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`merged_weights` one layer at a time: each merged weight is computed (fp32 math), cast to
    ``dtype`` and yielded, and nothing of it is kept once the next one is asked for, so a consumer
    that loads each weight and drops it holds one layer's merged weight at a time.

    Args:
        model: a model with LoRA layers (FSDP2-sharded allowed: every rank must iterate to the end,
            each weight is gathered whole, after the cast, so the gather moves ``dtype`` bytes).
        adapter_name: the adapter to merge.
        dtype: the dtype of the yielded weights (the consumer's); None keeps fp32.

    Yields:
        ``(state-dict name, merged weight)``, in model order; the weight is shaped like the base weight.
    """
    from .tensors import full_tensor

    for path, layer in lora_modules(unwrap_model(model)):
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        kind = quantization_of(layer.base_layer)
        if kind is not None:
            raise ValueError(f"cannot merge into '{path}': its base is quantized ({kind})")
        with torch.no_grad():
            value = _merged(layer, [adapter_name]).detach()
            if dtype is not None:
                value = value.to(dtype)  # before the gather: a sharded weight moves in the consumer's dtype
            value = full_tensor(value)
        yield _weight_name(path, layer), value
        del value  # the consumer may have dropped it: do not keep it alive while merging the next layer


def _weight_name(path: str, layer: LoraLayer) -> str:
    """The state-dict name of the weight ``layer`` (at ``path``) adapts."""
    param = getattr(layer, "param_name", None)
    if param is None:
        return f"{path}.weight"
    while path.endswith(".base_layer"):  # nested parameter wrappers: the owner module's path
        path = path[: -len(".base_layer")]
    return f"{path}.{param}"


def unmerge_lora(model: nn.Module) -> list[str]:
    """Subtract every merged adapter's update again (fp32 math), restoring the base weights.

    Returns:
        The paths of the layers whose weights changed.
    """
    changed = []
    for path, layer in lora_modules(model):
        if isinstance(layer, LoraLayer) and layer.merged_adapters:
            value = _merged(layer, layer.merged_adapters[::-1], sign=-1.0)
            layer.merged_adapters.clear()
            layer.write_base_weight(value)
            changed.append(path)
    return changed


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Take every LoRA wrapper out of ``model``, in place, and return it.

    Args:
        model: a model with LoRA layers.
        merge: True folds the active adapters into the base weights and keeps their
            ``modules_to_save`` copies; False restores the original base model.

    Returns:
        ``model``, with plain layers where the wrappers were.
    """
    root = unwrap_model(model)
    if merge:
        merge_lora(root)
    else:
        unmerge_lora(root)
    # Innermost first: nested parameter wrappers (experts.base_layer inside experts) unwrap cleanly.
    for path, module in reversed(list(lora_modules(root))):
        if isinstance(module, LoraLayer):
            _replace(root, path, module.base_layer)
        else:
            _replace(root, path, module.active_module() if merge else module.original_module)
    adapter_configs(root).clear()
    return model
