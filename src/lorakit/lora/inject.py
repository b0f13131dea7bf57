"""Putting adapters into a model: target matching, wrapping, freezing, and model-wide switches."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .experts import (
    LoraParameter,
    auto_target_parameters,
    fused_expert_params,
    general_name,
    match_parameters,
    param_dims,
    router_linear_ids,
    wrapper_paths,
)
from .layer import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave, check_adapter_name, is_conv1d, make_routes

# For "all-linear" on a model without get_output_embeddings(): leaf names taken to be the head.
_HEAD_NAMES = ("lm_head", "output")
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


def _wrappable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, LoraLayer)) or is_conv1d(module)


def _is_linear(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return isinstance(base, nn.Linear) or is_conv1d(base)


def _matches(path: str, spec: Union[list[str], str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def _layer_index(path: str, patterns: Union[str, Sequence[str], None]) -> Optional[int]:
    # PEFT's rule, so both pick the same layers: the first numbered segment after `<pattern>.`,
    # or without a pattern the first `<name>.<digits>.` that follows a dot.
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        return int(found["idx"]) if found else None
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
        if found:
            return int(found["idx"])
    return None


def _is_target(path: str, config: LoraConfig, names: Union[list[str], str]) -> bool:
    """PEFT's target rule (``check_target_module_exists``) with ``names`` the resolved target_modules."""
    if config.exclude_modules is not None and _matches(path, config.exclude_modules):
        return False
    # A module trained in full never takes LoRA, nor does anything inside it.
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in config.modules_to_save):
        return False
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    if path in names:  # a full path named explicitly bypasses layers_to_transform
        return True
    if not any(path.endswith("." + n) for n in names):
        return False
    if not config.layers_to_transform:
        return True
    return _layer_index(path, config.layers_pattern) in config.layers_to_transform


def is_target(path: str, config: LoraConfig, names: Union[list[str], str, None] = None) -> bool:
    """Whether ``config`` targets the module at ``path`` (PEFT's rule; exclusions and layers too).

    ``names`` is the resolved target list (default: ``config.target_modules``; resolve
    ``"all-linear"`` first, as it depends on the model). Backends that wrap other layer types
    (``lorakit.integrations.megatron``) match targets with this, so the rules stay the same.
    """
    names = config.target_modules if names is None else names
    if names == ALL_LINEAR:
        raise ValueError("resolve 'all-linear' to module names before calling is_target")
    return _is_target(path, config, names)


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, (LoraLayer, ModulesToSave)):
            head = getattr(head, "base_layer", None) or head.original_module
        return head
    return None


def check_variant_target(path: str, module: nn.Module, config: LoraConfig) -> None:
    """Refuse a LoRA variant on a layer type it is not defined for (before anything is wrapped)."""
    from .config import is_residual_init
    from .quant import is_quantized

    base = module.base_layer if isinstance(module, LoraLayer) else module
    linear = isinstance(base, nn.Linear) or is_conv1d(base)
    if config.use_dora and not (linear or isinstance(base, nn.Embedding)):
        raise ValueError(f"use_dora: module '{path}' is a {type(base).__name__}; lorakit's DoRA covers Linear, GPT-2 "
                         "Conv1D and Embedding layers: leave it out of target_modules or set use_dora: false")
    if is_residual_init(config.init_lora_weights):
        if not linear:
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r}: module '{path}' is a "
                             f"{type(base).__name__}; PiSSA/OLoRA initialise Linear and GPT-2 Conv1D layers only")
        if is_quantized(base):
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} rewrites the base weights, but module "
                             f"'{path}' is quantized: drop 'quantization' or use init_lora_weights: true")


@dataclass
class Target:
    """One module an adapter will wrap, with the rank and alpha it gets there."""

    path: str
    module: nn.Module
    r: int
    alpha: float
    param: Optional[str] = None
    """For a parameter target (``target_parameters``): the parameter's name on ``module``'s owner."""


def plan_injection(model: nn.Module, config: LoraConfig, adapter_name: str) -> tuple[list[Target], list[tuple[str, nn.Module]]]:
    """Decide, without changing ``model``, which modules ``config`` wraps and which it trains in full.

    Returns:
        ``(targets, saved)``: the LoRA targets, and the ``modules_to_save`` as (path, module).

    Raises:
        ValueError: nothing matches (listing candidate names), a match is not a layer type LoRA
            supports, or the adapter name is already used on a matched module.
    """
    check_adapter_name(adapter_name)
    model = unwrap_model(model)
    modules = list(iter_modules(model))
    spec = config.target_modules
    if not spec and not config.target_parameters:
        raise ValueError("LoraConfig.target_modules is empty: name the modules to wrap, or use 'all-linear'")
    names = resolve_all_linear(model, modules) if spec == ALL_LINEAR else (spec or [])

    if config.use_dora and config.modules_to_save:
        # PEFT's rule takes a module named in both lists out of the targets (it is trained in full),
        # which would silently drop DoRA there: refuse the overlap instead.
        unsaved = dataclasses.replace(config, modules_to_save=None)
        both = next((p for p, _ in modules if _matches(p, config.modules_to_save) and _is_target(p, unsaved, names)), None)
        if both is not None:
            raise ValueError(f"use_dora with modules_to_save: module '{both}' matches both target_modules and "
                             "modules_to_save; a module is either trained in full or carries DoRA, not both")
    targets: list[Target] = []
    for path, module in modules:
        if isinstance(module, LoraParameter) or not _is_target(path, config, names):
            continue
        if isinstance(module, ModulesToSave):
            raise ValueError(f"module '{path}' is trained in full (modules_to_save); it cannot also take LoRA")
        if not _wrappable(module):
            hint = ""
            if fused_expert_params(module):
                hint = (f"; its experts are stacked parameters: name them with target_parameters="
                        f"{[general_name(path + '.' + p) for p in fused_expert_params(module)]}")
            raise ValueError(
                f"module '{path}' matches target_modules but is a {type(module).__name__}; LoRA wraps "
                f"nn.Linear, nn.Embedding and GPT-2 Conv1D layers only{hint}"
            )
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            raise ValueError(f"adapter '{adapter_name}' already exists on '{path}'; pick another name or delete it first")
        check_variant_target(path, module, config)
        targets.append(Target(path, module, config.rank_for(path), config.alpha_for(path)))
    if not targets and spec:
        raise ValueError(_nothing_matched(model, modules, config))
    targets += _parameter_targets(modules, config, adapter_name)
    if not targets:
        raise ValueError(_nothing_matched(model, modules, config))

    saved: list[tuple[str, nn.Module]] = []
    if config.modules_to_save:
        target_paths = {t.path for t in targets}
        for path, module in modules:
            if not _matches(path, config.modules_to_save):
                continue
            if path in target_paths or isinstance(module, LoraLayer):
                raise ValueError(f"module '{path}' is in modules_to_save but already carries LoRA layers")
            if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
                raise ValueError(f"adapter '{adapter_name}' already has a trained copy of '{path}'")
            saved.append((path, module))
        if not saved:
            raise ValueError(f"LoraConfig.modules_to_save={config.modules_to_save!r} matched no module")
    return targets, saved


def _parameter_targets(modules: list[tuple[str, nn.Module]], config: LoraConfig, adapter_name: str) -> list[Target]:
    """The parameter targets (``target_parameters``; with ``all-linear``, every fused expert weight)."""
    wanted = config.target_parameters
    if wanted is None and config.target_modules == ALL_LINEAR:
        wanted = auto_target_parameters(modules)
    if not wanted:
        return []
    found = match_parameters(modules, wanted)
    if not found:
        candidates = sorted({f"{p.rsplit('.', 1)[-1]}.{n}" for p, m in modules if not p.endswith(".base_layer")
                             for n, q in m.named_parameters(recurse=False) if q.dim() >= 2})
        raise ValueError(f"LoraConfig.target_parameters={wanted!r} matched no parameter. "
                         f"Candidates (module.parameter): {', '.join(candidates[:20]) or 'none'}")
    targets = []
    for owner_path, module, params in found:
        if isinstance(module, LoraParameter):
            present = [w.param_name for w in reversed(module._chain())]
            if present != params:
                raise ValueError(
                    f"'{owner_path}' already carries LoRA on {present}; every adapter must target the same "
                    f"parameters of a module (this one targets {params}), as in PEFT"
                )
        owner = module.owner if isinstance(module, LoraParameter) else module
        paths = wrapper_paths(owner_path, params)
        for param in params:
            try:
                param_dims(owner, param)
            except ValueError as err:
                raise ValueError(f"'{owner_path}.{param}': {err}") from None
            key = f"{owner_path}.{param}"
            if isinstance(module, LoraParameter):
                wrapper = next(w for w in module._chain() if w.param_name == param)
                if adapter_name in wrapper.r:
                    raise ValueError(f"adapter '{adapter_name}' already exists on '{key}'; pick another name or delete it first")
            targets.append(Target(paths[param], module, config.rank_for(key), config.alpha_for(key), param=param))
    return targets


def resolve_all_linear(model: nn.Module, modules: Optional[list[tuple[str, nn.Module]]] = None) -> list[str]:
    """``"all-linear"`` as PEFT resolves it: the leaf names of every Linear/Conv1D but the output head.

    MoE routers and gates that are Linear layers (``router_linear_ids``) are left out too.
    """
    modules = list(iter_modules(model)) if modules is None else modules
    head = _output_head(model)
    routers = router_linear_ids(modules)
    leaves = set()
    for path, module in modules:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not _is_linear(module) or base is head or (head is None and path.split(".")[-1] in _HEAD_NAMES):
            continue
        if id(base) in routers:
            continue
        leaves.add(path.split(".")[-1])
    head_leaves = {p.split(".")[-1] for p, m in modules if head is not None and (m is head or getattr(m, "base_layer", None) is head)}
    return sorted(leaves - head_leaves)


def _nothing_matched(model: nn.Module, modules: list[tuple[str, nn.Module]], config: LoraConfig) -> str:
    leaves: dict[str, str] = {}
    for path, module in modules:
        if _wrappable(module):
            leaves.setdefault(path.split(".")[-1], path)
    shown = list(leaves.items())[:20]
    listing = ", ".join(f"{leaf} (e.g. {path})" for leaf, path in shown) or "none: the model has no Linear/Embedding layer"
    return (
        f"LoraConfig.target_modules={config.target_modules!r} matched no module of "
        f"{type(model).__name__}. Candidate module names: {listing}"
    )


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


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


def _adapter_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    owned: dict[str, list[nn.Parameter]] = {}
    for _, module in lora_modules(model):
        for name in module.adapter_names:
            owned.setdefault(name, []).extend(module.adapter_parameters(name))
    return owned


def set_adapter_trainable(model: nn.Module, adapter_name: str, trainable: bool) -> None:
    """Freeze the base and set one adapter's ``requires_grad``; other adapters are left alone.

    This is the rule ``inject_lora`` and ``load_adapter`` apply, so adding a frozen adapter (a
    reference policy, a second adapter for inference) never stops another from training, and
    the order adapters are added in does not matter:

    * every parameter no adapter owns (the base, ``original_module`` of trained-in-full
      modules) gets ``requires_grad=False``: lorakit never trains base weights;
    * ``adapter_name``'s parameters (LoRA A/B, its ``modules_to_save`` copies) get ``trainable``;
    * every other adapter's parameters keep the value they had.

    Use :func:`mark_trainable` to choose the whole set of trained adapters at once.
    """
    model = unwrap_model(model)
    owned = _adapter_params(model)
    ids = {id(p) for params in owned.values() for p in params}
    for p in model.parameters():
        if id(p) not in ids:
            p.requires_grad_(False)
    for p in owned.get(adapter_name, []):
        p.requires_grad_(trainable)


def mark_trainable(model: nn.Module, adapter_names_: Union[str, Sequence[str], None]) -> None:
    """Make exactly ``adapter_names_`` trainable: every other parameter, base or adapter, is frozen.

    Args:
        model: a model with LoRA layers.
        adapter_names_: one adapter, several, or None (freeze everything).
    """
    model = unwrap_model(model)
    names = [] if adapter_names_ is None else [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_)
    owned = _adapter_params(model)
    unknown = [n for n in names if n not in owned]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {list(owned)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        for p in owned[name]:
            p.requires_grad_(True)


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


@dataclass
class TrainableReport:
    """Parameter counts of a LoRA model, printable in the seed's log style."""

    total: int
    trainable: int
    wrapped_modules: int
    adapters: dict[str, LoraConfig]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = ["LoRA configuration:"]
        for name, cfg in self.adapters.items():
            targets = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules or [])
            lines.append(
                f"  - Adapter '{name}': r={cfg.r}, alpha={cfg.alpha:g}, dropout={cfg.dropout:g}, "
                f"rslora={cfg.use_rslora}, targets=[{targets}]"
            )
            if cfg.target_parameters:
                lines.append(f"  - Adapter '{name}' expert/parameter targets (one A, B per expert): "
                             + ", ".join(cfg.target_parameters))
        lines += [
            f"  - Wrapped modules: {self.wrapped_modules}",
            f"  - Total parameters: {self.total:,}",
            f"  - Trainable parameters: {self.trainable:,}",
            f"  - Trainable %: {self.percent:.4f}%",
        ]
        return "\n".join(lines)


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count total and trainable parameters and the wrapped modules of ``model``."""
    model = unwrap_model(model)
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    wrapped = sum(1 for _ in lora_modules(model))
    return TrainableReport(total, trainable, wrapped, dict(adapter_configs(model)))
