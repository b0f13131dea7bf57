"""FSDP2 sharded from the first byte: build the base on the meta device, shard it, then read only
this rank's slices of the safetensors checkpoint.

The usual way (every rank loads the whole base, then ``fully_shard`` frees what it does not keep)
peaks at a whole base per rank, so FSDP2 would save nothing where it matters: a base too large for
one device. Here the sequence is

1. ``build_meta_model``: the model's parameters on ``meta`` (no storage), its buffers real (rotary
   ``inv_freq`` and friends are computed at construction and are not in the checkpoint);
2. the recipe injects LoRA as usual (its weights stay on meta too), then ``init_meta_adapters``
   gives the adapters real storage and initialises them with exactly the random draws a
   one-process run makes, in the same order;
3. ``wrap`` shards blocks then root (``fully_shard`` on meta parameters only records the layout),
   then ``load_sharded`` allocates this rank's shards and fills each from the matching slice of
   the checkpoint (safetensors reads a slice without reading the rest: one shard is the largest
   buffer), the adapters from their saved values, and the buffers as constructed.

Anything this path cannot rebuild exactly from the files (a quantized base, DoRA or PiSSA/OLoRA,
whose init reads the base weights; ``modules_to_save`` copies; an ``init_adapter``; checkpoint keys
that are not the model's own, as fused MoE experts) is reported by ``sharded_load_refusal`` and
loads the old way, whole on every rank, with a logged note.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..lora import adapter_configs, lora_modules
from ..lora.config import is_residual_init
from ..lora.layer import LoraLayer

_LORA_PART = ".base_layer"


@dataclass
class CheckpointIndex:
    """Where each tensor of a safetensors checkpoint lives."""

    files: dict[str, Path]
    """Tensor name -> the .safetensors file holding it."""
    shapes: dict[str, tuple[int, ...]]
    """Tensor name -> shape."""
    nbytes: int
    """Bytes of all tensors together (the whole state a rank must never hold)."""


@dataclass
class LoadStats:
    """What one rank read from the checkpoint while loading its shards."""

    bytes_read: int = 0
    largest_read: int = 0
    """The largest single slice (the bounded buffer)."""
    tensors: int = 0
    replayed: list[str] = field(default_factory=list)


def checkpoint_index(model_dir: str) -> Optional[CheckpointIndex]:
    """Index the safetensors files of a local HF model dir (None: not a local safetensors checkpoint)."""
    from safetensors import safe_open

    root = Path(model_dir)
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        paths = sorted({root / f for f in weight_map.values()})
    elif (root / "model.safetensors").is_file():
        paths = [root / "model.safetensors"]
    else:
        return None
    files: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    nbytes = 0
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                shape = tuple(piece.get_shape())
                files[key], shapes[key] = path, shape
                numel = 1
                for n in shape:
                    numel *= n
                nbytes += numel * _DTYPE_BYTES.get(piece.get_dtype(), 4)
    return CheckpointIndex(files, shapes, nbytes)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def sharded_load_refusal(cfg: Any) -> Optional[str]:
    """Why ``cfg`` cannot load its base sharded (None: it can). Decided from the config alone."""
    lora = cfg.lora
    if cfg.quantization:
        return "quantization quantizes the whole base while loading"
    if cfg.init_adapter:
        return "init_adapter is loaded into a whole model"
    if lora.use_dora:
        return "DoRA's magnitude is initialised from the base weights"
    if is_residual_init(lora.init_lora_weights):
        return f"init_lora_weights={lora.init_lora_weights!r} initialises the adapter from the base weights"
    if lora.modules_to_save:
        return "modules_to_save copies base modules"
    return None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on ``meta``; buffers keep their real values.

    Parameters are created as usual (one at a time, with initialisation switched off by the caller)
    and moved to meta as each module registers it, so at most one tensor is ever allocated.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_meta_model(model_dir: str, dtype: torch.dtype, attn_implementation: Optional[str] = None) -> nn.Module:
    """The HF causal LM of ``model_dir`` with its parameters on meta and its buffers real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(model_dir)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with no_init_weights(), _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()  # ties made while parameters moved to meta may have come apart; the config decides
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        pass  # no generation_config.json: the one derived from the config stays
    return model.eval()


def checkpoint_key(name: str, index: CheckpointIndex) -> Optional[str]:
    """The checkpoint key of model parameter ``name`` (LoRA's ``.base_layer`` and wrappers removed)."""
    key = name.replace(_LORA_PART, "")
    for candidate in (key, key.split(".", 1)[1] if "." in key else key, f"model.{key}"):
        if candidate in index.files:
            return candidate
    return None


def _names_by_tensor(module: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter/buffer: a tied weight (embeddings and head) has several, and
    the checkpoint may hold it under any one of them."""
    names: dict[int, list[str]] = {}
    for name, tensor in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    return names


def _key_of(names: list[str], index: CheckpointIndex, prefix: str = "") -> Optional[str]:
    for name in names:
        key = checkpoint_key(name[len(prefix):] if prefix and name.startswith(prefix) else name, index)
        if key is not None:
            return key
    return None


def mismatched_keys(model: nn.Module, index: CheckpointIndex) -> list[str]:
    """Model parameters the checkpoint does not hold (under any of their names) with the same shape."""
    aliases = _names_by_tensor(model)
    missing = []
    for name, param in model.named_parameters():
        key = _key_of(aliases[id(param)], index)
        if key is None or index.shapes[key] != tuple(param.shape):
            missing.append(name)
    return missing


def init_meta_adapters(model: nn.Module) -> None:
    """Give adapters injected into a meta model real (CPU) storage and their initial values.

    Call it right where a one-process run injects LoRA (same RNG state). It replays that run's
    random draws in its order: adapter by adapter, layer by layer, each new submodule's own
    constructor init (``nn.Linear`` draws kaiming weights as it is built), then ``reset_adapter``.
    So the adapters, and the RNG state after, are exactly those of the one-process run.
    """
    configs = adapter_configs(model)
    layers = list(lora_modules(model))
    for name, config in configs.items():
        for path, layer in layers:
            if not isinstance(layer, LoraLayer):
                raise ValueError(f"sharded loading cannot initialise '{path}' (a modules_to_save copy)")
            if name not in layer.r:
                continue
            for store in layer._stores():
                if name not in store:
                    continue
                item = store[name]
                if isinstance(item, nn.Module):
                    item.to_empty(device="cpu")
                    if hasattr(item, "reset_parameters"):
                        item.reset_parameters()
                elif item.is_meta:
                    store[name] = nn.Parameter(torch.empty_like(item, device="cpu"), requires_grad=item.requires_grad)
            layer.reset_adapter(name, config.init_lora_weights)


def _local_region(param: torch.Tensor) -> tuple[slice, ...]:
    """The slice of the whole tensor that this rank's shard of DTensor ``param`` holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def snapshot_real(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters and buffers that already hold values (adapters, buffers): what
    ``to_empty`` would otherwise wipe."""
    kept = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not tensor.is_meta:
            kept[name] = tensor.detach().clone()
    return kept


@torch.no_grad()
def load_sharded(module: nn.Module, index: CheckpointIndex, kept: dict[str, torch.Tensor], device: torch.device,
                 prefix: str = "model.") -> LoadStats:
    """Allocate this rank's shards of the sharded ``module`` and fill them.

    Args:
        module: the ``fully_shard``-ed root (still on meta), e.g. the LossModule around the model.
        index: the base checkpoint.
        kept: ``snapshot_real`` taken before sharding: adapter weights and buffers, whole.
        device: where the shards live (FSDP2 moves CPU-offloaded ones itself).
        prefix: what ``module`` puts before the HF model's own parameter names.

    Returns:
        What was read: bytes, the largest single slice, tensor count.
    """
    from safetensors import safe_open

    aliases = _names_by_tensor(module)
    module.to_empty(device=device)
    stats = LoadStats()
    handles: dict[Path, Any] = {}
    try:
        for name, param in module.named_parameters():
            local = _local(param)
            region = _local_region(param) if hasattr(param, "to_local") else tuple(slice(0, n) for n in param.shape)
            if name in kept:
                local.copy_(kept[name][region])
                continue
            key = _key_of(aliases[id(param)], index, prefix)
            if key is None:
                raise ValueError(f"sharded load: the checkpoint has no tensor for parameter '{name}'")
            path = index.files[key]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt").__enter__()
            piece = handles[path].get_slice(key)[region] if local.numel() else torch.empty(local.shape)
            nbytes = piece.numel() * piece.element_size()
            stats.bytes_read += nbytes
            stats.largest_read = max(stats.largest_read, nbytes)
            stats.tensors += 1
            local.copy_(piece.to(local.dtype))
        for name, buffer in module.named_buffers():
            if name in kept:
                buffer.copy_(kept[name])
            else:
                key = _key_of(aliases[id(buffer)], index, prefix)
                if key is None:
                    raise ValueError(f"sharded load: no value for buffer '{name}'")
                path = index.files[key]
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt").__enter__()
                buffer.copy_(handles[path].get_tensor(key).to(buffer.dtype))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return stats


def load_report(stats: LoadStats, index: CheckpointIndex) -> str:
    """One line for the log: what each rank read, against the whole checkpoint (a collective: the
    process group exists whenever FSDP2 does)."""
    import torch.distributed as dist

    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, (stats.bytes_read, stats.largest_read))
    mib = 2 ** 20
    per_rank = ", ".join(f"{read / mib:,.1f}" for read, _ in every)
    largest = max(big for _, big in every)
    return (f"FSDP2 sharded load: MiB read per rank [{per_rank}] of the {index.nbytes / mib:,.1f} MiB checkpoint; "
            f"largest single read {largest / mib:,.2f} MiB")
