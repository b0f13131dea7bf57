"""A LoRA model's module tree: unwrapping, walking, replacing a submodule, and the adapter configs a model holds.

Everything else in the core that walks a model (targets, injection, adapter state, merge, io) goes
through these, so DDP/torch.compile wrappers and nested parameter wrappers are handled once.
"""

from __future__ import annotations

from typing import Iterator, Union

from torch import nn

from .config import LoraConfig
from .experts import LoraParameter
from .layer import LoraLayer, ModulesToSave

_REGISTRY = "_lorakit_configs"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the LoRA layers: strips DDP's ``.module`` and torch.compile's ``_orig_mod``."""
    while True:
        kind = type(model).__name__
        if kind == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif kind == "DistributedDataParallel" and hasattr(model, "module"):
            model = model.module
        else:
            return model


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config of each adapter injected into ``model``, by adapter name."""
    model = unwrap_model(model)
    registry = model.__dict__.get(_REGISTRY)
    if registry is None:
        registry = {}
        model.__dict__[_REGISTRY] = registry
    return registry


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules`` without the root, but never descends into a LoRA wrapper's internals."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, (LoraLayer, ModulesToSave)):
            yield from iter_modules(child, path)
        # Parameter wrappers nest (PEFT's layout): each inner one is a LoRA layer of its own.
        while isinstance(child, LoraParameter) and isinstance(child.base_layer, LoraParameter):
            child, path = child.base_layer, path + ".base_layer"
            yield path, child


def lora_modules(model: nn.Module) -> Iterator[tuple[str, Union[LoraLayer, ModulesToSave]]]:
    """Every LoRA wrapper (layers and trained copies) in ``model``, with its path."""
    for name, module in iter_modules(unwrap_model(model)):
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
