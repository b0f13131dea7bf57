"""Which modules an adapter wraps: PEFT's target rule, decided without changing the model.

Names, suffixes, a regex or ``"all-linear"``; ``exclude_modules``, ``layers_to_transform`` /
``layers_pattern``, ``modules_to_save``; per-module rank and alpha (``rank_pattern`` /
``alpha_pattern``); parameter targets (``target_parameters``, fused MoE experts). ``plan_injection``
returns the plan that ``inject_lora`` carries out; the Megatron backend matches with ``is_target``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

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
from .layer import LoraLayer, ModulesToSave, check_adapter_name, is_conv1d
from .tree import iter_modules, unwrap_model

# For "all-linear" on a model without get_output_embeddings(): leaf names taken to be the head.
_HEAD_NAMES = ("lm_head", "output")


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
