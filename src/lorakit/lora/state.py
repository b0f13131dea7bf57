"""Adapter state of a model: which adapters exist, which are active, disabled or routed per row, deleting one."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .layer import LoraLayer, ModulesToSave, make_routes
from .tree import adapter_configs, lora_modules, unwrap_model

def adapter_names(model: nn.Module) -> list[str]:
    """Names of all adapters present in ``model``, in the order they were added."""
    names: dict[str, None] = dict.fromkeys(adapter_configs(model))
    for _, module in lora_modules(model):
        names.update(dict.fromkeys(module.adapter_names))
    return list(names)


def set_active_adapters(model: nn.Module, names: Union[str, Sequence[str]]) -> None:
    """Make ``names`` the adapters every LoRA layer adds (their updates sum); ``[]`` runs the base.

    Raises:
        ValueError: a name is not an adapter of ``model``.
    """
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {known}")
    modules = [m for _, m in lora_modules(model)]
    for module in modules:  # check all before switching any: a refusal leaves the model as it was
        if isinstance(module, ModulesToSave):
            module.check_active(names)
    for module in modules:
        module.set_active(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters currently active (as set by ``set_active_adapters`` or ``inject_lora``)."""
    for _, module in lora_modules(model):
        return list(module.active_adapters)
    return []


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the bare base model inside the block (the RL reference policy); adapters come back after.

    No weight is written, so the model after the block is bit for bit the model before it, in
    any dtype and after any number of blocks. A merged adapter's update is part of the base
    weights, so inside the block each merged layer computes ``base(x) - scale * B(A(x))``
    (in the adapters' dtype, float32 for half-precision bases, without dropout, with no
    gradient to A and B) instead of unmerging. For a half-precision merged model that output
    differs from the original base model's by the rounding the merge itself introduced (as the
    merged model's output differs from the unmerged adapter's); unmerging and re-merging
    instead would rewrite the weights on every call, and cost a pass over every merged weight.
    """
    modules = [m for _, m in lora_modules(model)]
    with _set_on_all(modules, "disabled", True):
        yield


@contextlib.contextmanager
def route_adapters(model: nn.Module, row_adapters: Sequence[Optional[str]]) -> Iterator[None]:
    """Inside the block, row ``i`` of every batch uses adapter ``row_adapters[i]`` (None: the base).

    Rows are grouped per adapter, so a batch mixing k adapters costs k LoRA passes per layer. Put
    each adapter's rows next to each other (``adapter_order``) and those passes run on views of the
    batch with no per-row gather or scatter, forward or backward (otherwise each adapter's rows are
    gathered and its update scattered back).
    The batch must be the first dimension of every wrapped layer's input. LoRA layers also take one
    entry per token (``B * T`` entries, row-major): samples of several adapters packed into one row
    with no padding (training several jobs at once); ``modules_to_save`` copies take rows only.
    """
    with RowRouting(model, row_adapters).apply():
        yield


def adapter_order(row_adapters: Sequence[Optional[str]]) -> list[int]:
    """A permutation of the rows that puts each adapter's rows next to each other, adapters in the
    order they first appear, rows of one adapter in their own order (a stable sort).

    Build the batch as ``rows[order]`` and route it with ``[row_adapters[i] for i in order]``; row
    ``j`` of the results belongs to the caller's row ``order[j]``.
    """
    first: dict[Optional[str], int] = {}
    for name in row_adapters:
        first.setdefault(name, len(first))
    return sorted(range(len(row_adapters)), key=lambda i: first[row_adapters[i]])


class RowRouting:
    """``route_adapters``, built once and applied to many forwards (a decode loop whose batch keeps
    its rows): the per-row route tensors, and the LoRA layers' caches keyed on them, are reused.

    Build a new one when the rows change or adapters are loaded or deleted.
    """

    def __init__(self, model: nn.Module, row_adapters: Sequence[Optional[str]]) -> None:
        known = adapter_names(model)
        unknown = sorted({n for n in row_adapters if n is not None and n not in known})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in row_adapters; the model has {known}")
        self.modules = [m for _, m in lora_modules(model)]
        if any(isinstance(m, LoraLayer) and m.merged_adapters for m in self.modules):
            raise RuntimeError("per-row adapter routing needs unmerged adapters; call unmerge_lora first")
        device = next((p.device for p in unwrap_model(model).parameters()), torch.device("cpu"))
        self.routes = make_routes(row_adapters, device)

    @contextlib.contextmanager
    def apply(self) -> Iterator[None]:
        """Inside the block, the model's LoRA layers route rows as built."""
        with _set_on_all(self.modules, "row_routes", self.routes):
            yield


@contextlib.contextmanager
def _set_on_all(modules: list[nn.Module], attr: str, value: object) -> Iterator[None]:
    previous = [getattr(m, attr) for m in modules]
    for m in modules:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, was in zip(modules, previous):
            setattr(m, attr, was)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every layer (the wrappers stay for other adapters)."""
    if adapter_name not in adapter_names(model):
        raise ValueError(f"unknown adapter '{adapter_name}'; the model has {adapter_names(model)}")
    if any(isinstance(m, LoraLayer) and adapter_name in m.merged_adapters for _, m in lora_modules(model)):
        raise RuntimeError(f"adapter '{adapter_name}' is merged; unmerge before deleting it")
    for _, module in lora_modules(model):
        if adapter_name in module.adapter_names:
            module.delete(adapter_name)
    adapter_configs(model).pop(adapter_name, None)
