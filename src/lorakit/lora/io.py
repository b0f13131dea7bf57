"""Adapter files: the PEFT layout (read and written) and the seed's minimal ``.pth`` (read only).

PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (the adapter name is not in the key). Only
safetensors are written; pickle files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_directory, atomic_file
from .config import CONFIG_NAME, LoraConfig
from .inject import inject_lora
from .state import active_adapters, adapter_names, set_active_adapters
from .targets import Target, plan_injection
from .trainable import set_adapter_trainable
from .tree import adapter_configs, lora_modules, unwrap_model
from .experts import LoraParameter, lora_shapes
from .layer import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave, linear_dims
from .tensors import copy_whole_, full_tensor

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_SEED_KEY = re.compile(r"^(?P<path>.+)\.lora\.(?P<ab>[AB])\.weight$")

PathLike = Union[str, os.PathLike]


# --- state dicts -----------------------------------------------------------------------------
def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Tensors of one adapter keyed ``<module path>.<PEFT suffix>`` (no prefix), live, not copies."""
    out: dict[str, torch.Tensor] = {}
    for path, module in lora_modules(model):
        if adapter_name not in module.adapter_names:
            continue
        if isinstance(module, (LoraLinear, LoraParameter)):  # expert wrappers store A/B in PEFT's stacked layout
            out[f"{path}.lora_A.weight"] = module.lora_A[adapter_name].weight
            out[f"{path}.lora_B.weight"] = module.lora_B[adapter_name].weight
            dora = getattr(module, "lora_magnitude_vector", {})  # expert wrappers have no DoRA
            if adapter_name in dora:  # DoRA: PEFT's key has no ".weight"
                out[f"{path}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name]
        elif isinstance(module, LoraEmbedding):
            out[f"{path}.lora_embedding_A"] = module.lora_embedding_A[adapter_name]
            out[f"{path}.lora_embedding_B"] = module.lora_embedding_B[adapter_name]
            if adapter_name in module.lora_magnitude_vector:
                out[f"{path}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name]
        elif isinstance(module, ModulesToSave):
            for key, value in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = value
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's weights with PEFT's keys (``base_model.model.<path>.lora_A.weight``), detached.

    This is what ``save_adapter`` writes and what a rollout backend needs to receive.
    """
    if adapter_name not in adapter_names(model):
        raise ValueError(f"unknown adapter '{adapter_name}'; the model has {adapter_names(model)}")
    # Under FSDP2 each weight is a DTensor: gathered whole (a collective: every rank calls this).
    return {PEFT_PREFIX + k: full_tensor(v.detach()) for k, v in _adapter_tensors(model, adapter_name).items()}


def set_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy new weights into an existing adapter, in place (no re-injection, no new parameters).

    ``tensors`` uses the keys of ``adapter_state_dict`` (with or without the PEFT prefix); every
    key and shape is checked before any weight changes. This is how a rollout backend receives an
    updated policy: only the adapter travels, the base never does.
    """
    model = unwrap_model(model)
    if adapter_name not in adapter_names(model):
        raise ValueError(f"unknown adapter '{adapter_name}'; the model has {adapter_names(model)}")
    live = _adapter_tensors(model, adapter_name)
    tensors = _strip_prefix(tensors)
    _check_fit({k: tuple(v.shape) for k, v in live.items()}, {}, tensors, f"weights for adapter '{adapter_name}'")
    with torch.no_grad():
        for key, value in tensors.items():
            copy_whole_(live[key], value)
    _weights_changed(model, adapter_name)


def _weights_changed(model: nn.Module, adapter_name: str) -> None:
    """Tell every layer holding ``adapter_name`` that its weights were rewritten (caches rebuild)."""
    for _, module in lora_modules(model):
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            module.weights_changed()


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in tensors.items()}


def _expected_shapes(targets: list[Target], saved: list[tuple[str, nn.Module]],
                     use_dora: bool = False) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for t in targets:
        base = t.module.base_layer if isinstance(t.module, LoraLayer) else t.module
        if t.param is not None:
            owner = t.module.owner if isinstance(t.module, LoraParameter) else t.module
            shapes[f"{t.path}.lora_A.weight"], shapes[f"{t.path}.lora_B.weight"] = lora_shapes(owner, t.param, t.r)
        elif isinstance(base, nn.Embedding):
            shapes[f"{t.path}.lora_embedding_A"] = (t.r, base.num_embeddings)
            shapes[f"{t.path}.lora_embedding_B"] = (base.embedding_dim, t.r)
            if use_dora:  # one magnitude per embedding dimension, as in PEFT
                shapes[f"{t.path}.lora_magnitude_vector"] = (base.embedding_dim,)
        else:
            fan_in, fan_out = linear_dims(base)
            shapes[f"{t.path}.lora_A.weight"] = (t.r, fan_in)
            shapes[f"{t.path}.lora_B.weight"] = (fan_out, t.r)
            if use_dora:
                shapes[f"{t.path}.lora_magnitude_vector"] = (fan_out,)
    for path, module in saved:
        original = module.original_module if isinstance(module, ModulesToSave) else module
        for key, value in original.state_dict().items():
            shapes[f"{path}.{key}"] = tuple(value.shape)
    return shapes


def _check_fit(expected: dict[str, tuple[int, ...]], optional: dict[str, tuple[int, ...]],
               tensors: dict[str, torch.Tensor], source: str) -> None:
    problems = []
    for key, shape in expected.items():
        if key not in tensors:
            problems.append(f"missing key '{key}' (module '{_module_of(key)}' expects shape {tuple(shape)})")
        elif tuple(tensors[key].shape) != tuple(shape):
            problems.append(
                f"shape mismatch for '{key}' (module '{_module_of(key)}'): "
                f"file has {tuple(tensors[key].shape)}, model expects {tuple(shape)}"
            )
    for key, value in tensors.items():
        if key in expected:
            continue
        if key in optional:
            if tuple(value.shape) != optional[key]:
                problems.append(f"shape mismatch for '{key}': file has {tuple(value.shape)}, model expects {optional[key]}")
            continue
        problems.append(f"unexpected key '{key}' (module '{_module_of(key)}' is not a target of this adapter in the model)")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{source}: adapter does not fit the model; nothing was changed:\n  {shown}{more}")


def _module_of(key: str) -> str:
    for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector", ".base_layer."):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]


# --- reading files ---------------------------------------------------------------------------
def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling error has many types; all mean "not a weights file"
        raise ValueError(f"{path}: cannot read as a weights-only torch file ({type(err).__name__}: {err})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors")
    return data


def _from_seed_format(tensors: dict[str, torch.Tensor], source: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Convert ``<module>.lora.A.weight`` / ``.lora.B.weight`` (seed 003) to a config and PEFT keys.

    That LoRA adds ``B(A(x))`` with no scaling, so each module gets alpha = its rank (scale 1).
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        found = _SEED_KEY.match(key)
        if not found:
            raise ValueError(f"{source}: key '{key}' is not '<module>.lora.A.weight' or '<module>.lora.B.weight'")
        pairs.setdefault(found["path"], {})[found["ab"]] = value
    converted: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{source}: module '{path}' has lora.{'A' if 'A' in ab else 'B'} but not its partner")
        ranks[path] = ab["A"].shape[0]
        converted[f"{path}.lora_A.weight"] = ab["A"]
        converted[f"{path}.lora_B.weight"] = ab["B"]
    r = Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(p): k for p, k in ranks.items() if k != r}
    config = LoraConfig(r=r, alpha=r, target_modules=sorted(ranks), rank_pattern=odd, alpha_pattern=dict(odd))
    return config, converted


def read_adapter(path: PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], str]:
    """Read an adapter from a PEFT directory or a seed-style ``.pth`` file.

    Returns:
        ``(config, tensors keyed '<module path>.<suffix>' without the PEFT prefix, source)``.
    """
    path = Path(path)
    if path.is_dir():
        config = LoraConfig.from_json(path / CONFIG_NAME)
        if (path / WEIGHTS_NAME).is_file():
            source = str(path / WEIGHTS_NAME)
            try:
                tensors = load_file(source)
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"{source}: cannot read safetensors ({err})") from None
        elif (path / PICKLE_WEIGHTS_NAME).is_file():
            source = str(path / PICKLE_WEIGHTS_NAME)
            tensors = _load_pickle(path / PICKLE_WEIGHTS_NAME)
        else:
            raise FileNotFoundError(f"{path}: has {CONFIG_NAME} but no {WEIGHTS_NAME} or {PICKLE_WEIGHTS_NAME}")
        return config, _strip_prefix(tensors), source
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter directory or file")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as err:
            raise ValueError(f"{path}: cannot read safetensors ({err})") from None
    else:
        tensors = _load_pickle(path)
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    if (path.parent / CONFIG_NAME).is_file() and not any(_SEED_KEY.match(k.removeprefix("module.")) for k in tensors):
        return LoraConfig.from_json(path.parent / CONFIG_NAME), _strip_prefix(tensors), str(path)
    config, converted = _from_seed_format(tensors, str(path))
    return config, converted, str(path)


# --- public save / load ----------------------------------------------------------------------
def load_adapter(
    model: nn.Module,
    path: PathLike,
    adapter_name: str = "default",
    trainable: bool = False,
    activate: bool = True,
) -> LoraConfig:
    """Load an adapter into ``model``: PEFT directory, or seed-style ``.pth`` (alpha = r).

    If ``model`` has no adapter ``adapter_name`` yet, it is injected from the saved config.
    Everything is checked before anything changes: on error the model is exactly as before.

    Args:
        model: the base model (or one that already carries adapters).
        path: adapter directory (``adapter_config.json`` + weights) or a ``.pth`` file.
        adapter_name: name the adapter gets in ``model``.
        trainable: leave the adapter's parameters requiring grad (to continue training it);
            False freezes this adapter only. The base is frozen and other adapters keep their
            ``requires_grad`` (see :func:`lorakit.lora.trainable.set_adapter_trainable`).
        activate: make it the one active adapter.

    Returns:
        The adapter's config.

    Raises:
        ValueError: a missing or unexpected key or a shape mismatch (naming the module and both
            shapes), an invalid config, or an unreadable file.
    """
    return load_read_adapter(model, read_adapter(path), adapter_name, trainable, activate)


def load_read_adapter(model: nn.Module, read: tuple[LoraConfig, dict[str, torch.Tensor], str],
                      adapter_name: str = "default", trainable: bool = False, activate: bool = True) -> LoraConfig:
    """``load_adapter`` from what ``read_adapter`` returned, for a caller that also needs the tensors
    it read (a server fingerprints exactly the weights it loads)."""
    model = unwrap_model(model)
    config, tensors, source = read
    exists = adapter_name in adapter_names(model)
    if exists:
        live = _adapter_tensors(model, adapter_name)
        expected = {k: tuple(v.shape) for k, v in live.items()}
        layers = [(p, m) for p, m in lora_modules(model) if isinstance(m, LoraLayer) and adapter_name in m.r]
        if any(adapter_name in m.merged_adapters for _, m in layers):
            raise RuntimeError(f"adapter '{adapter_name}' is merged; unmerge before loading new weights into it")
        base_weights = {p: m.base_layer.weight for p, m in layers if _vocabulary_layer(model, m.base_layer)}
    else:
        targets, saved = plan_injection(model, config, adapter_name)
        expected = _expected_shapes(targets, saved, config.use_dora)
        bases = {t.path: getattr(t.module, "base_layer", t.module) for t in targets if t.param is None}
        base_weights = {p: b.weight for p, b in bases.items() if _vocabulary_layer(model, b)}
    embeddings = list(base_weights)
    # PEFT saves the embedding's and the head's base weights next to their LoRA (save_embedding_layers,
    # for resized vocabularies); accept them, and load them into the base as PEFT does.
    optional = {f"{p}.base_layer.weight": tuple(base_weights[p].shape) for p in embeddings}
    _check_fit(expected, optional, tensors, source)

    previous = active_adapters(model)
    if exists:
        for layer_path, layer in layers:
            # rank_pattern/alpha_pattern name a parameter target by its parameter's path, as in PEFT.
            layer.set_scale(adapter_name, config.alpha_for(getattr(layer, "param_path", layer_path)), config.use_rslora)
            layer.set_dropout(adapter_name, config.dropout)
        adapter_configs(model)[adapter_name] = config
        set_adapter_trainable(model, adapter_name, trainable)
    else:
        inject_lora(model, config, adapter_name, trainable=trainable)
        live = _adapter_tensors(model, adapter_name)
    with torch.no_grad():
        for key, value in tensors.items():
            if key in live:
                copy_whole_(live[key], value)
            else:
                copy_whole_(base_weights[key[: -len(".base_layer.weight")]], value)
    _weights_changed(model, adapter_name)
    set_active_adapters(model, [adapter_name] if activate else [n for n in previous if n != adapter_name])
    return config


def _vocabulary_layer(model: nn.Module, base: nn.Module) -> bool:
    """Whether ``base`` is the input embedding or the output head (the layers PEFT may save whole)."""
    if isinstance(base, nn.Embedding):
        return True
    get_head = getattr(unwrap_model(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head is not None and (head is base or getattr(head, "base_layer", None) is base)  # wrapped already


def save_adapter(model: nn.Module, path: PathLike, adapter_name: Optional[str] = None,
                 convert_to_lora: bool = True) -> list[Path]:
    """Write adapters in the PEFT layout, atomically.

    With ``adapter_name`` None every adapter is written as PEFT does: ``default`` in ``path``,
    each other one in ``path/<name>``. With a name, only that adapter is written, in ``path``.
    A PiSSA/OLoRA adapter is written as the equivalent plain LoRA for the untouched base
    (``convert_to_lora``, see ``lora.residual``), so it serves on the original model.

    Returns:
        The directories written.
    """
    model = unwrap_model(model)
    configs = adapter_configs(model)
    names = [adapter_name] if adapter_name is not None else list(configs)
    if not names:
        raise ValueError("the model has no LoRA adapter to save")
    root = Path(path)
    written = []
    for name in names:
        if name not in configs:
            raise ValueError(f"unknown adapter '{name}'; the model has {list(configs)}")
        target = root if adapter_name is not None or name == "default" else root / name
        config, tensors = final_adapter(model, name) if convert_to_lora else (configs[name], adapter_state_dict(model, name))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        _write_adapter_dir(target, config.to_json_string(), tensors)
        written.append(target)
    return written


def initial_adapter(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (A0, B0) of a PiSSA/OLoRA adapter as its training started (empty otherwise)."""
    from .residual import initial_weights

    found = {}
    for path, module in lora_modules(unwrap_model(model)):
        if isinstance(module, LoraLinear) and adapter_name in module.r:
            start = initial_weights(module, adapter_name)
            if start is not None:
                found[path] = start
    return found


def final_adapter(model: nn.Module, adapter_name: str = "default") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter as it should be published: config and PEFT-keyed tensors, a PiSSA/OLoRA adapter
    converted to plain LoRA relative to the untouched base (every rank must call this under FSDP2)."""
    from .residual import is_residual_init, to_plain_lora

    config = adapter_configs(unwrap_model(model))[adapter_name]
    tensors = adapter_state_dict(model, adapter_name)
    if not is_residual_init(config.init_lora_weights):
        return config, tensors
    return to_plain_lora(config, tensors, initial_adapter(model, adapter_name))


def write_adapter(path: PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter directory from a config and PEFT-keyed tensors (e.g. gathered on another rank)."""
    target = Path(path)
    _write_adapter_dir(target, config.to_json_string(),
                       {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    return target


def _write_adapter_dir(target: Path, config_json: str, tensors: dict[str, torch.Tensor]) -> None:
    def weights(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": "pt"})

    if not target.exists():
        # A new directory is built aside and renamed into place: readers see all of it or none.
        with atomic_directory(target) as staging:
            weights(str(staging / WEIGHTS_NAME))
            (staging / CONFIG_NAME).write_text(config_json, encoding="utf-8")
        return
    # An existing one may hold other files (a tokenizer, a README): each of ours is replaced
    # atomically, weights first, so the config never describes weights that are not there yet.
    atomic_file(target / WEIGHTS_NAME, weights)
    atomic_file(target / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json, encoding="utf-8"))
