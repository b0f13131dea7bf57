"""FSDP2 sharded from the first byte: build the base on the meta device, shard it, then read only
this rank's slices of the safetensors checkpoint.

The usual way (every rank loads the whole base, then ``fully_shard`` frees what it does not keep)
peaks at a whole base per rank, so FSDP2 would save nothing where it matters: a base too large for
one device. Here the sequence is

1. ``build_meta_model``: the model's parameters on ``meta`` (no storage), its buffers real (rotary
   ``inv_freq`` and friends are computed at construction and are not in the checkpoint);
2. the recipe injects LoRA as usual (its weights stay on meta too), then ``init_meta_adapters``
   gives the adapters real storage and initialises them with exactly the random draws a
   one-process run makes, in the same order; the steps that read the base (DoRA's magnitude,
   PiSSA/OLoRA's A, B and residual base) are deferred, with the random state they start from;
3. ``wrap`` shards blocks then root (``fully_shard`` on meta parameters only records the layout),
   then ``load_sharded`` allocates this rank's shards and fills each from its rows of the
   checkpoint (FSDP2 shards by rows, and rows are one contiguous byte range of a safetensors file:
   one plain read straight into the shard, no memory map), the adapters from their saved values,
   ``modules_to_save`` copies from the rows of the module they copy, and the buffers as constructed;
4. ``finish_adapter_init`` runs the deferred steps one module at a time: every rank gathers that
   module's base weight (and the adapter's shards), runs the step as one process does, keeps its
   own rows of what changed and drops the rest. An ``init_adapter`` or a resumed checkpoint is
   then loaded into the shards (``lora.tensors.copy_whole_``: each rank copies its own region).

Only a quantized base is refused (``sharded_load_refusal``): it is loaded on the CPU and quantized
layer by layer as it moves to the device. A checkpoint whose keys are not the model's own is
loaded whole on the CPU (never the device) and ``fully_shard`` moves each rank's shards.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..lora import adapter_configs, lora_modules
from ..lora.experts import LoraParameter
from ..lora.layer import LoraLayer, ModulesToSave
from ..lora.residual import skip_draws
from ..lora.tensors import copy_whole_, local_region

_LORA_PART = ".base_layer"


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass
class TensorEntry:
    """Where one tensor's bytes sit in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the tensor's data in the file."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class FusedExperts:
    """A fused ``(experts, rows, cols)`` MoE weight that the checkpoint holds per expert (the hub
    layout transformers converts while loading): expert ``e``'s slice is ``parts[e]`` stacked along
    its rows (gate then up for ``gate_up_proj``; the one down projection for ``down_proj``)."""

    parts: list[list[TensorEntry]]
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class CheckpointIndex:
    """Where each tensor of a safetensors checkpoint lives (read from the files' headers), plus
    ``FusedExperts`` entries under the model's fused names for experts stored one by one."""

    entries: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors together (the whole state a rank must never hold)."""
        stored = {id(e): e for e in self.entries.values() if isinstance(e, TensorEntry)}  # aliases once
        return sum(e.nbytes for e in stored.values())

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape


@dataclass
class LoadStats:
    """What one rank read from the checkpoint while loading its shards."""

    bytes_read: int = 0
    largest_read: int = 0
    """The largest single read (the bounded buffer)."""
    tensors: int = 0
    gathered: int = 0
    """Bytes of whole base weights gathered (all-gather) for the deferred adapter init steps."""
    largest_gather: int = 0
    """The largest single gathered tensor: one module's weight, never more."""


def _header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor '{key}' has dtype {info['dtype']}, which sharded loading does not read")
        entries[key] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + info["data_offsets"][0])
    return entries


def checkpoint_index(model_dir: str) -> Optional[CheckpointIndex]:
    """Index the safetensors files of a local HF model dir (None: not a local safetensors checkpoint)."""
    root = Path(model_dir)
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        paths = sorted({root / f for f in json.loads(index_file.read_text())["weight_map"].values()})
    elif (root / "model.safetensors").is_file():
        paths = [root / "model.safetensors"]
    else:
        return None
    entries: dict[str, Any] = {}
    for path in paths:
        entries.update(_header(path))
    entries.update(fused_expert_entries(entries))
    # Mixtral's checkpoint names its MoE block block_sparse_moe; transformers' model calls it mlp
    entries.update({k.replace(".block_sparse_moe.", ".mlp."): e for k, e in list(entries.items())
                    if ".block_sparse_moe." in k and isinstance(e, TensorEntry)})
    return CheckpointIndex(entries)


# Per-expert checkpoint names (Qwen2/3-MoE, DeepSeek, OLMoE, ...: gate/up/down_proj; Mixtral: w1/w3/w2
# under block_sparse_moe) and the fused parameters transformers builds from them while loading.
_EXPERT_KEY = re.compile(r"^(?P<owner>.+)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_FUSED_FROM = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}


def fused_expert_entries(entries: dict[str, TensorEntry]) -> dict[str, FusedExperts]:
    """``FusedExperts`` entries for MoE experts a checkpoint holds one by one, keyed by the fused
    parameter names transformers gives them (``<owner>.experts.gate_up_proj`` / ``down_proj``;
    Mixtral's ``block_sparse_moe`` is the model's ``mlp``), so a sharded load reads each rank's
    experts straight from the per-expert tensors. Owners with a gap in their expert numbers or
    unequal shapes are left out (the load then falls back, saying so)."""
    found: dict[tuple[str, str], dict[int, TensorEntry]] = {}
    for key, entry in entries.items():
        match = _EXPERT_KEY.match(key)
        if match:
            found.setdefault((match["owner"], match["proj"]), {})[int(match["e"])] = entry
    fused: dict[str, FusedExperts] = {}
    owners = {owner for owner, _ in found}
    for owner in sorted(owners):
        for name, spellings in _FUSED_FROM.items():
            for projs in spellings:
                per = [found.get((owner, proj)) for proj in projs]
                if any(p is None for p in per) or len({len(p) for p in per}) != 1:
                    continue
                experts = len(per[0])
                if any(sorted(p) != list(range(experts)) for p in per):
                    continue
                parts = [[p[e] for p in per] for e in range(experts)]
                first = parts[0]
                if any([(t.shape, t.dtype) for t in row] != [(t.shape, t.dtype) for t in first] for row in parts) or \
                        any(len(t.shape) != 2 or t.shape[1] != first[0].shape[1] for t in first):
                    continue
                rows = sum(t.shape[0] for t in first)
                target = owner.replace(".block_sparse_moe", ".mlp")
                fused[f"{target}.experts.{name}"] = FusedExperts(parts, first[0].dtype, (experts, rows, first[0].shape[1]))
    return fused


def read_rows(entry: Any, rows: slice, out: torch.Tensor) -> int:
    """Copy rows ``rows`` (dim 0) of a checkpoint tensor into ``out`` with plain file reads.

    Rows of a row-major tensor are one contiguous byte range, so a rank reads exactly its shard and
    nothing else, straight into the shard's storage when the dtypes match. No memory map: the pages
    it touches would count against the process. A ``FusedExperts`` entry's rows are experts: each
    of them is read from its own per-expert tensors. Returns the bytes read.
    """
    if isinstance(entry, FusedExperts):
        done = 0
        for i, expert in enumerate(range(rows.start, rows.stop)):
            offset = 0
            for part in entry.parts[expert]:
                done += read_rows(part, slice(0, part.shape[0]), out[i, offset:offset + part.shape[0]])
                offset += part.shape[0]
        return done
    row = math.prod(entry.shape[1:]) * entry.dtype.itemsize
    count = (rows.stop - rows.start) * row
    direct = out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous()
    target = out if direct else torch.empty(out.shape, dtype=entry.dtype)
    if count:
        view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        with open(entry.path, "rb", buffering=0) as handle:
            handle.seek(entry.start + rows.start * row)
            done = 0
            while done < count:
                got = handle.readinto(view[done:])
                if not got:
                    raise ValueError(f"{entry.path}: truncated checkpoint (tensor at byte {entry.start})")
                done += got
    if not direct:
        out.copy_(target)
    return count


def sharded_load_refusal(cfg: Any) -> Optional[str]:
    """Why ``cfg`` cannot load its base sharded (None: it can). Decided from the config alone.

    DoRA, PiSSA/OLoRA, ``modules_to_save`` and ``init_adapter`` all load sharded (their base-reading
    steps run after sharding, one module at a time); only quantization does not.
    """
    if cfg.quantization:
        return (f"quantization: {cfg.quantization} quantizes the base as it loads, on the CPU, layer by layer as each "
                "moves to the device (the device never holds the unquantized base; every rank holds the quantized one)")
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


_SAVED_PART = re.compile(r"\.original_module(?=\.)|\.modules_to_save\.[^.]+(?=\.)")


def checkpoint_key(name: str, index: CheckpointIndex) -> Optional[str]:
    """The checkpoint key of model parameter ``name`` (LoRA's ``.base_layer`` and wrappers removed; a
    ``modules_to_save`` copy reads the rows of the module it copies)."""
    key = _SAVED_PART.sub("", name.replace(_LORA_PART, ""))
    for candidate in (key, key.split(".", 1)[1] if "." in key else key, f"model.{key}"):
        if candidate in index.entries:
            return candidate
    return None


def _names_by_tensor(module: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter/buffer: a tied weight (embeddings and head) has several, and
    the checkpoint may hold it under any one of them."""
    names: dict[int, list[str]] = {}
    for name, tensor in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    for saved in module.modules():  # a modules_to_save copy of a tied head is read under the tie's names too
        if isinstance(saved, ModulesToSave):
            original = list(saved.original_module.named_parameters(remove_duplicate=False))
            for copy in saved.modules_to_save.values():
                for (_, mine), (_, theirs) in zip(copy.named_parameters(remove_duplicate=False), original):
                    names.setdefault(id(mine), []).extend(names.get(id(theirs), []))
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
        if key is None or index.shape(key) != tuple(param.shape):
            missing.append(name)
    return missing


_DEFERRED = "_deferred_base_init"


@dataclass
class DeferredInit:
    """An adapter init step that reads the base weight, waiting for the sharded base."""

    init: Any
    """The adapter's ``init_lora_weights``."""
    rng_before: Optional[torch.Tensor] = None
    """The CPU random state the step starts from, when it draws (``pissa_niter_<N>``)."""
    rng_after: Optional[torch.Tensor] = None
    """The state after ``skip_draws``: the real step must leave the same."""


def init_meta_adapters(model: nn.Module) -> None:
    """Give adapters injected into a meta model real (CPU) storage and their initial values.

    Call it right where a one-process run injects LoRA (same RNG state). It replays that run's
    random draws in its order: adapter by adapter, layer by layer, each new submodule's own
    constructor init (``nn.Linear`` draws kaiming weights as it is built), then ``reset_adapter``.
    So the adapters, and the RNG state after, are exactly those of the one-process run.

    What reads the base weight (``LoraLayer.init_from_base``: DoRA's magnitude, PiSSA/OLoRA) waits
    on the layer for ``finish_adapter_init`` after sharding; a PiSSA sketch's random draws are
    skipped here (``skip_draws``) and replayed there from the state recorded now. A
    ``modules_to_save`` copy needs nothing: it is read from the checkpoint like the base.
    """
    configs = adapter_configs(model)
    layers = _injection_order(list(lora_modules(model)))
    for name, config in configs.items():
        for path, layer in layers:
            if isinstance(layer, ModulesToSave):
                continue
            if not isinstance(layer, LoraLayer):
                raise ValueError(f"sharded loading cannot initialise '{path}' ({type(layer).__name__})")
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
            init = config.init_lora_weights
            if not layer.reads_base(name, init):
                layer.reset_adapter(name, init)
                continue
            layer.reset_without_base(name, init)
            step = DeferredInit(init)
            if isinstance(init, str) and init.startswith("pissa_niter_"):
                step.rng_before = torch.get_rng_state()
                skip_draws(layer, name, init)
                step.rng_after = torch.get_rng_state()
            layer.__dict__.setdefault(_DEFERRED, {})[name] = step


def _injection_order(layers: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """LoRA wrappers in the order ``inject_lora`` gives them their weights (so a replay draws the
    same random numbers for the same tensors): the parameter wrappers (MoE experts) first, owner by
    owner, each owner's chain from the innermost wrapper (its first parameter) out; then the
    layers, in module order."""
    chains: dict[str, list[tuple[str, Any]]] = {}
    rest = []
    for path, layer in layers:
        if isinstance(layer, LoraParameter):
            chains.setdefault(path.split(_LORA_PART)[0], []).append((path, layer))
        else:
            rest.append((path, layer))
    wrapped = [item for chain in chains.values() for item in sorted(chain, key=lambda pl: -pl[0].count(_LORA_PART))]
    return wrapped + rest


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
        device: where the shards live (CPU when FSDP2 offloads them).
        prefix: what ``module`` puts before the HF model's own parameter names.

    Returns:
        What was read: bytes, the largest single read, tensor count.
    """
    aliases = _names_by_tensor(module)
    module.to_empty(device=device)
    stats = LoadStats()
    for name, param in module.named_parameters():
        local = _local(param)
        region = local_region(param)
        if name in kept:
            local.copy_(kept[name][region])
            continue
        key = _key_of(aliases[id(param)], index, prefix)
        if key is None:
            raise ValueError(f"sharded load: the checkpoint has no tensor for parameter '{name}'")
        if not region or any(r != slice(0, n) for r, n in zip(region[1:], param.shape[1:])):
            raise ValueError(f"sharded load: '{name}' is not sharded by rows (dim 0)")
        nbytes = read_rows(index.entries[key], region[0], local)
        stats.bytes_read += nbytes
        stats.largest_read = max(stats.largest_read, nbytes)
        stats.tensors += 1
    for name, buffer in module.named_buffers():
        if name in kept:
            buffer.copy_(kept[name])
            continue
        key = _key_of(aliases[id(buffer)], index, prefix)
        if key is None:
            raise ValueError(f"sharded load: no value for buffer '{name}'")
        whole = index.entries[key]
        stats.bytes_read += read_rows(whole, slice(0, whole.shape[0] if whole.shape else 1), buffer)
    return stats


def _gather_whole(param: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded parameter (an all-gather), on the mesh's device: offloaded shards
    live in host memory but gather over the device's backend."""
    from torch.distributed.tensor import DTensor

    local = param.to_local()
    device = param.device_mesh.device_type
    if local.device.type != device:
        local = local.to(device)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride()).full_tensor()


@contextlib.contextmanager
def _whole_module(layer: LoraLayer, name: str, stats: LoadStats) -> Iterator[None]:
    """Inside: ``layer``'s base parameters and adapter ``name``'s are whole plain tensors (gathered);
    on exit each rank copies its own region of them back into its shards and the whole copies go.

    The sharded parameters are put back as the very objects FSDP2 manages (FSDP2 swaps registered
    parameters itself around each forward); nothing else runs in between.
    """
    slots: list[tuple[nn.Module, str]] = [(layer.base_layer, key) for key in layer.base_layer._parameters]
    for store in layer._stores():
        if name in store:
            item = store[name]
            slots += [(item, key) for key in item._parameters] if not isinstance(item, nn.Parameter) else [(store, name)]
    swapped = []
    for owner, key in slots:
        param = owner._parameters[key]
        if param is None or getattr(param, "device_mesh", None) is None:
            continue  # not sharded: this rank holds it whole already
        whole = _gather_whole(param)
        if owner is layer.base_layer:
            stats.gathered += whole.numel() * whole.element_size()
            stats.largest_gather = max(stats.largest_gather, whole.numel() * whole.element_size())
        owner._parameters[key] = nn.Parameter(whole, requires_grad=param.requires_grad)
        swapped.append((owner, key, param))
    try:
        yield
    finally:
        for owner, key, param in swapped:
            copy_whole_(param, owner._parameters[key].detach())
            owner._parameters[key] = param


@torch.no_grad()
def finish_adapter_init(module: nn.Module, stats: LoadStats) -> None:
    """Run the adapter init steps ``init_meta_adapters`` deferred (DoRA's magnitude, PiSSA/OLoRA's
    A, B and residual base), now that the base is loaded sharded: one module at a time, every rank
    gathers that module's base weight, runs ``init_from_base`` exactly as one process does, keeps
    its own rows of what changed (adapter, residual base) and drops the whole copy. Never more than
    one module's weight is whole on a rank. Every rank must call this (all-gathers, in module order).

    Raises:
        RuntimeError: a PiSSA sketch drew other random numbers than ``skip_draws`` skipped (the one
            process run would differ).
    """
    for path, layer in _injection_order(list(lora_modules(module))):
        pending = layer.__dict__.pop(_DEFERRED, None) if isinstance(layer, LoraLayer) else None
        for name, step in (pending or {}).items():
            with _whole_module(layer, name, stats):
                if step.rng_before is None:
                    layer.init_from_base(name, step.init)
                    continue
                now = torch.get_rng_state()
                torch.set_rng_state(step.rng_before)
                try:
                    layer.init_from_base(name, step.init)
                    on_cpu = layer.base_layer.weight.device.type == "cpu"
                    if on_cpu and not torch.equal(torch.get_rng_state(), step.rng_after):
                        raise RuntimeError(f"sharded load: init_lora_weights={step.init!r} on '{path}' drew other "
                                           "random numbers than lora.residual.skip_draws skipped; the adapters would "
                                           "differ from a one-process run")
                finally:
                    torch.set_rng_state(now)
            layer.weights_changed()  # caches built from the whole copies go with them


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
