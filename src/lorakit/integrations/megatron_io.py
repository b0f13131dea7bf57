"""Megatron LoRA weights leaving and entering the model: per-rank checkpoints, LoRA-free base
checkpoints, HF PEFT export (in process and offline) and import.

Part of ``lorakit.integrations.megatron`` (which re-exports everything public here); split out
by responsibility. megatron-core is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ..lora.atomic import atomic_file
from ..lora.config import LoraConfig
from ..lora.state import delete_adapter
from ..lora.trainable import set_adapter_trainable
from ..lora.tree import adapter_configs, lora_modules
from ..lora.io import read_adapter, write_adapter
from ..lora.parallel import COLUMN, ROW, ParallelLoraLinear, unshard_tensor
from .megatron_hf import (
    EXPERT_PARAMS,
    HF_NAMES,
    ModuleInfo,
    expert_wrapper_keys,
    from_hf_adapter,
    hf_module,
    role_of,
    to_hf_adapter,
)
from .megatron_model import apply_lora_to_megatron_model, model_chunks

logger = logging.getLogger("lorakit.integrations.megatron")

META_NAME = "lora_meta.json"
SHARD_NAME = "adapter_shard.safetensors"
Chunks = Union[nn.Module, list, tuple]


# --- what export and checkpoints need to know -----------------------------------------------------
def _layer_index(chunk: nn.Module, path: str) -> int:
    # Megatron's TransformerLayer.layer_number is global and 1-based (pipeline offset included).
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner = chunk.get_submodule(".".join(parts[:cut]))
        number = getattr(owner, "layer_number", None)
        if isinstance(number, int):
            return number - 1
    found = re.search(r"(^|\.)layers\.(\d+)\.", path)
    return int(found.group(2)) if found else -1


def _expert_place(chunk: nn.Module, path: str) -> tuple[int, int, int]:
    """``(global expert index, experts in the layer, expert-parallel rank)`` of a ``SequentialMLP``
    expert's linear at ``path`` (``...experts.local_experts.<j>.linear_fc1``)."""
    owner_path, _, rest = path.partition(".local_experts.")
    owner = chunk.get_submodule(owner_path)
    local = int(rest.split(".", 1)[0])
    ep_group = getattr(owner, "ep_group", None)
    ep_size = ep_group.size() if ep_group is not None else 1
    ep_rank = ep_group.rank() if ep_group is not None else 0
    return ep_rank * owner.num_local_experts + local, ep_size * owner.num_local_experts, ep_rank


def module_infos(model: Chunks, adapter_name: str = "default") -> list[tuple[ModuleInfo, ParallelLoraLinear]]:
    """Every wrapped layer carrying ``adapter_name``, with what export needs to know about it."""
    out = []
    for index, chunk in enumerate(model_chunks(model)):
        for path, layer in lora_modules(chunk):
            if not isinstance(layer, ParallelLoraLinear) or adapter_name not in layer.r:
                continue
            expert, num_experts, ep_rank = -1, 0, 0
            if role_of(path) in EXPERT_PARAMS:
                expert, num_experts, ep_rank = _expert_place(chunk, path)
            config = getattr(layer.base_layer, "config", None)
            heads = int(getattr(config, "num_attention_heads", 0) or 0)
            groups = int(getattr(config, "num_query_groups", None) or heads)
            head_dim = int(getattr(config, "kv_channels", None) or (heads and getattr(config, "hidden_size", 0) // heads))
            role = role_of(path)
            if role == "qkv" and getattr(config, "attention_output_gate", False):
                role = ""  # q/gate/k/v: no HF counterpart in Llama/Qwen layouts
            info = ModuleInfo(
                key=f"model{index}.{path}", role=role, layer=_layer_index(chunk, path),
                parallel_mode=layer.parallel_mode, in_features=layer.in_features, out_features=layer.out_features,
                partition_stride=layer.partition_stride, r=layer.r[adapter_name],
                alpha=layer.lora_alpha[adapter_name], use_rslora=layer.use_rslora[adapter_name],
                num_heads=heads, num_query_groups=groups, head_dim=head_dim,
                gated=bool(getattr(config, "gated_linear_unit", False)),
                expert=expert, num_experts=num_experts, ep_rank=ep_rank,
            )
            out.append((info, layer))
    return out


def _parallel_ranks() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tp": 0, "tp_size": 1, "pp": 0, "pp_size": 1, "dp": 0, "ep": 0, "ep_size": 1, "etp_size": 1, "edp": 0}
    return {"tp": ps.get_tensor_model_parallel_rank(), "tp_size": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_rank(), "pp_size": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
            "ep_size": ps.get_expert_model_parallel_world_size(),
            "etp_size": ps.get_expert_tensor_parallel_world_size(), "edp": ps.get_expert_data_parallel_rank()}


def _pp_group() -> Optional[dist.ProcessGroup]:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group() if ps.model_parallel_is_initialized() else None


def _ep_group() -> Optional[dist.ProcessGroup]:
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_group() if ps.model_parallel_is_initialized() else None


def _shard_folder(root: Path, tp: int, pp: int, ep: int, ep_size: int) -> Path:
    # Megatron's own naming: the expert-parallel rank is appended only when EP > 1.
    return root / (f"mp_rank_{tp:02d}_{pp:03d}" + (f"_{ep:03d}" if ep_size > 1 else ""))


def _gather_experts(local: list, ranks: dict[str, int]) -> list:
    """Under expert parallelism each EP rank holds other experts: collect every rank's expert
    entries (``(ModuleInfo, ...)`` tuples), keeping the dense ones (EP ranks' replicas) once."""
    if ranks["ep_size"] == 1:
        return local
    experts = [item for item in local if item[0].role in EXPERT_PARAMS]
    gathered: list[Any] = [None] * ranks["ep_size"]
    dist.all_gather_object(gathered, experts, group=_ep_group())
    return [item for item in local if item[0].role not in EXPERT_PARAMS] + [i for part in gathered for i in part]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- checkpoints: every rank its shards ---------------------------------------------------------
def save_megatron_lora(model: Chunks, path: Union[str, os.PathLike], adapter_name: str = "default") -> Path:
    """Save the LoRA weights (only them: the base is unchanged) as per-rank shards. A collective.

    Layout: ``path/mp_rank_<tp:02d>_<pp:03d>/adapter_shard.safetensors`` (one per TP x PP rank,
    written by data-parallel rank 0) and ``path/lora_meta.json`` (config, parallel sizes, every
    layer's full shapes and split), written last: a directory with the meta file is complete.
    Each file is written to a temp name and renamed.
    """
    chunks = model_chunks(model)
    infos = module_infos(chunks, adapter_name)
    if not infos:
        raise ValueError(f"the model has no LoRA adapter '{adapter_name}' to save")
    ranks = _parallel_ranks()
    root = Path(path)
    # Under expert parallelism the EP ranks hold different experts: one writer per EP rank (its
    # expert-data-parallel rank 0; the dense LoRA in its file is a replica of the others').
    if (ranks["edp"] if ranks["ep_size"] > 1 else ranks["dp"]) == 0:
        tensors = {}
        for info, layer in infos:
            tensors[f"{info.key}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().cpu().contiguous()
            tensors[f"{info.key}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().cpu().contiguous()
        folder = _shard_folder(root, ranks["tp"], ranks["pp"], ranks["ep"], ranks["ep_size"])
        folder.mkdir(parents=True, exist_ok=True)
        atomic_file(folder / SHARD_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    # The meta lists every pipeline stage's (and expert-parallel rank's) layers: one file.
    local = [(info,) for info, _ in infos]
    local = [info.to_dict() for (info,) in _gather_experts(local, ranks)]
    if ranks["pp_size"] > 1:
        gathered: list[Any] = [None] * ranks["pp_size"]
        dist.all_gather_object(gathered, local, group=_pp_group())
        local = [item for part in gathered for item in part]
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        config = adapter_configs(chunks[0]).get(adapter_name) or next(
            adapter_configs(c)[adapter_name] for c in chunks if adapter_name in adapter_configs(c))
        meta = {"format": "lorakit-megatron-lora", "version": 1, "tp_size": ranks["tp_size"],
                "pp_size": ranks["pp_size"], "ep_size": ranks["ep_size"], "etp_size": ranks["etp_size"],
                "config": config.to_peft_dict(), "modules": local}
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        atomic_file(root / META_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    _barrier()
    return root


def _read_meta(root: Path) -> dict:
    meta_path = root / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root}: no {META_NAME}; not a (complete) checkpoint written by save_megatron_lora")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != "lorakit-megatron-lora":
        raise ValueError(f"{meta_path}: not a lorakit Megatron LoRA checkpoint")
    return meta


def _full_from_files(root: Path, meta: dict, pp: int, wanted: set[str], ep: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsharded) LoRA tensors of pipeline stage ``pp`` (expert-parallel rank ``ep``) from
    every TP rank's file.

    Raises:
        ValueError: expert layers split over an expert-TP size other than the TP size (their
            shards do not line up with the TP files).
    """
    ep_size = meta.get("ep_size", 1)
    infos = {m["key"]: ModuleInfo(**m) for m in meta["modules"] if m.get("ep_rank", 0) == ep or m["role"] not in EXPERT_PARAMS}
    if meta.get("etp_size", 1) != meta["tp_size"] and any(i.role in EXPERT_PARAMS for i in infos.values()):
        raise ValueError(f"{root}: expert layers were saved with expert-TP size {meta.get('etp_size')} and TP size "
                         f"{meta['tp_size']}; rebuilding them from the files needs both equal (reload it with the "
                         "same parallel layout, then export_hf_adapter in process)")
    shards = []
    for tp in range(meta["tp_size"]):
        file = _shard_folder(root, tp, pp, ep, ep_size) / SHARD_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing shard of TP rank {tp}, PP rank {pp}, EP rank {ep}")
        shards.append(load_file(str(file)))
    full = {}
    for key in wanted:
        if key not in shards[0]:
            continue
        module_key, which = key.rsplit(".lora_", 1)
        info = infos[module_key]
        which = "lora_" + which.split(".")[0]
        dim = {COLUMN: {"lora_A": None, "lora_B": 0}, ROW: {"lora_A": 1, "lora_B": None}}[info.parallel_mode][which]
        parts = [s[key] for s in shards]
        stride = info.partition_stride if which == "lora_B" else 1
        full[key] = parts[0] if dim is None else unshard_tensor(parts, dim, stride)
    return full


def load_megatron_lora(model: Chunks, path: Union[str, os.PathLike], adapter_name: str = "default") -> LoraConfig:
    """Load a checkpoint of :func:`save_megatron_lora` into a model already injected with the adapter.

    The same TP size reloads each rank's own shards bit for bit; another TP size is resharded
    exactly (full tensors are rebuilt from all shards and split again). The pipeline layout must
    match. Every key and shape is checked before any weight changes.

    Raises:
        ValueError: a layer missing on either side, a shape or rank mismatch, or another PP size.
    """
    root = Path(path)
    meta = _read_meta(root)
    ranks = _parallel_ranks()
    if meta["pp_size"] != ranks["pp_size"]:
        raise ValueError(f"{root}: saved with pipeline size {meta['pp_size']}, this model runs {ranks['pp_size']}")
    if meta.get("ep_size", 1) != ranks["ep_size"]:
        raise ValueError(f"{root}: saved with expert-parallel size {meta.get('ep_size', 1)}, this model runs "
                         f"{ranks['ep_size']}; export it to HF (python -m lorakit.integrations.megatron export) and "
                         "import_hf_adapter it instead")
    infos = module_infos(model, adapter_name)
    if not infos:
        raise ValueError(f"the model has no LoRA adapter '{adapter_name}'; inject it before loading its weights")
    wanted = {f"{i.key}.lora_{w}.weight" for i, _ in infos for w in "AB"}
    if meta["tp_size"] == ranks["tp_size"] and meta.get("etp_size", 1) == ranks["etp_size"]:
        file = _shard_folder(root, ranks["tp"], ranks["pp"], ranks["ep"], ranks["ep_size"]) / SHARD_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing shard of TP rank {ranks['tp']}, PP rank {ranks['pp']}")
        tensors = load_file(str(file))
        resharded = False
    else:
        tensors = _full_from_files(root, meta, ranks["pp"], wanted, ranks["ep"])
        resharded = True
    problems = []
    plan = []
    for info, layer in infos:
        for which, store in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            key = f"{info.key}.{which}.weight"
            live = store[adapter_name].weight
            if key not in tensors:
                problems.append(f"missing '{key}' (layer '{info.key}' has adapter '{adapter_name}')")
                continue
            value = layer.shard(which, tensors[key]) if resharded else tensors[key]
            if tuple(value.shape) != tuple(live.shape):
                problems.append(f"shape mismatch for '{key}': checkpoint {tuple(value.shape)}, model {tuple(live.shape)}")
            plan.append((live, value))
    extra = sorted(k for k in tensors if k not in wanted)
    problems += [f"unexpected '{k}' (no such LoRA layer in this model)" for k in extra]
    if problems:
        shown = "\n  ".join(problems[:20])
        raise ValueError(f"{root}: LoRA checkpoint does not fit the model; nothing was changed:\n  {shown}")
    with torch.no_grad():
        for live, value in plan:
            live.copy_(value)
    return LoraConfig.from_dict(meta["config"], source=str(root / META_NAME))


@dataclass
class BaseLoadReport:
    """What :func:`load_base_checkpoint` did."""

    loaded: int
    """Number of base tensors loaded."""
    fresh_lora: list[str]
    """LoRA tensors the checkpoint did not have: they keep their fresh initialisation."""


def load_base_checkpoint(chunk: nn.Module, state_dict: dict[str, Any]) -> BaseLoadReport:
    """Load a model state dict into a LoRA-injected chunk: the seeds' ``strict=False`` issue, solved.

    A checkpoint of the model before LoRA names ``...linear_qkv.weight``; the wrapper maps it onto
    ``...linear_qkv.base_layer.weight``. LoRA tensors the checkpoint lacks are reported (fresh
    init), but a missing base tensor or an unknown key is an error, as with ``strict=True``.

    Raises:
        ValueError: base keys missing from the checkpoint, or keys the model does not have.
    """
    chunk = model_chunks(chunk)[0]
    result = chunk.load_state_dict(state_dict, strict=False)
    lora = re.compile(r"(^|\.)lora_[AB]\.")
    fresh = [k for k in result.missing_keys if lora.search(k)]
    missing = [k for k in result.missing_keys if not lora.search(k)]
    problems = [f"missing base key '{k}'" for k in missing] + [f"unexpected key '{k}'" for k in result.unexpected_keys]
    if problems:
        shown = "\n  ".join(problems[:20])
        raise ValueError(f"base checkpoint does not fit the model:\n  {shown}")
    if fresh:
        logger.info("base checkpoint loaded; %d LoRA tensors are freshly initialised (not in the checkpoint)", len(fresh))
    return BaseLoadReport(loaded=len(state_dict) - len(result.unexpected_keys), fresh_lora=fresh)


# --- HF PEFT export / import ---------------------------------------------------------------------
def gather_lora(model: Chunks, adapter_name: str = "default") -> list[tuple[ModuleInfo, torch.Tensor, torch.Tensor]]:
    """Every layer's full ``(info, A, B)``, gathered over TP (and PP) ranks, on every rank. A collective."""
    local = []
    for info, layer in module_infos(model, adapter_name):
        a = layer.gather("lora_A", layer.lora_A[adapter_name].weight.detach()).cpu()
        b = layer.gather("lora_B", layer.lora_B[adapter_name].weight.detach()).cpu()
        local.append((info, a, b))
    ranks = _parallel_ranks()
    local = _gather_experts(local, ranks)
    if ranks["pp_size"] > 1:
        gathered: list[Any] = [None] * ranks["pp_size"]
        dist.all_gather_object(gathered, local, group=_pp_group())
        local = [item for part in gathered for item in part]
    return local


def export_hf_adapter(model: Chunks, path: Union[str, os.PathLike], adapter_name: str = "default",
                      base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapter as an HF PEFT adapter of the matching Llama/Qwen-style model. A collective.

    ``linear_qkv`` becomes ``q_proj/k_proj/v_proj`` (A shared, B split per Megatron's grouped
    query layout), ``linear_fc1`` ``gate_proj/up_proj``, ``linear_proj`` ``o_proj`` and
    ``linear_fc2`` ``down_proj``; layer ``i`` is ``model.layers.i``. Global rank 0 writes.
    """
    modules = gather_lora(model, adapter_name)
    if not modules:
        raise ValueError(f"the model has no LoRA adapter '{adapter_name}' to export")
    config = next(adapter_configs(c)[adapter_name] for c in model_chunks(model) if adapter_name in adapter_configs(c))
    target = Path(path)
    if not dist.is_initialized() or dist.get_rank() == 0:
        hf_config, tensors = to_hf_adapter(modules, config, base_model_name_or_path)
        write_adapter(target, hf_config, tensors)
    _barrier()
    return target


def export_hf_adapter_from_checkpoint(ckpt: Union[str, os.PathLike], path: Union[str, os.PathLike],
                                      base_model_name_or_path: Optional[str] = None) -> Path:
    """Offline export: a :func:`save_megatron_lora` checkpoint (any TP/PP) -> HF PEFT adapter. No Megatron needed."""
    root = Path(ckpt)
    meta = _read_meta(root)
    infos = [ModuleInfo(**m) for m in meta["modules"]]
    modules = []
    seen: set[tuple[str, int]] = set()
    for pp in range(meta["pp_size"]):
        for ep in range(meta.get("ep_size", 1)):
            wanted = {f"{i.key}.lora_{w}.weight" for i in infos for w in "AB"}
            full = _full_from_files(root, meta, pp, wanted, ep)
            for info in infos:
                key = f"{info.key}.lora_A.weight"
                place = (info.key, info.ep_rank if info.role in EXPERT_PARAMS else -1)
                if key in full and place not in seen and (info.role not in EXPERT_PARAMS or info.ep_rank == ep):
                    seen.add(place)
                    modules.append((info, full[key], full[f"{info.key}.lora_B.weight"]))
    config = LoraConfig.from_dict(meta["config"], source=str(root / META_NAME))
    hf_config, tensors = to_hf_adapter(modules, config, base_model_name_or_path)
    return write_adapter(path, hf_config, tensors)


def import_hf_adapter(model: Chunks, path: Union[str, os.PathLike], adapter_name: str = "default",
                      trainable: bool = True) -> LoraConfig:
    """Load an HF PEFT adapter (q/k/v, o, gate/up, down projections) into Megatron shards. A collective.

    If the model does not carry ``adapter_name`` yet, it is injected on the Megatron layer types
    whose HF projections the adapter has (and removed again if the import fails). Exact where
    representable: a fused layer needs the same A, rank and alpha for all of its projections
    present; a projection the adapter leaves out gets zero B rows, a layer it leaves out zero B.

    Raises:
        ValueError: projections of a fused layer disagree, a shape or rank does not fit, or the
            adapter has weights for layers this model (this pipeline stage) lacks; no LoRA weight
            was changed.
    """
    hf_config, tensors, source = read_adapter(path)
    chunks = model_chunks(model)
    injected = False
    if not module_infos(chunks, adapter_name):
        # Megatron paths (as regexes) of the HF projections and expert parameters the adapter holds.
        roles = {"q_proj": r"self_attention\.linear_qkv", "k_proj": r"self_attention\.linear_qkv",
                 "v_proj": r"self_attention\.linear_qkv", "o_proj": r"self_attention\.linear_proj",
                 "gate_proj": r"mlp\.linear_fc1", "up_proj": r"mlp\.linear_fc1", "down_proj": r"mlp\.linear_fc2"}
        experts = {"gate_up_proj": r"mlp\.experts\.local_experts\.\d+\.linear_fc1",
                   "down_proj": r"mlp\.experts\.local_experts\.\d+\.linear_fc2"}
        leaves = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}
        present = {roles[leaf] for leaf in leaves if leaf in roles}
        present |= {experts[t.rsplit(".", 1)[-1]] for t in hf_config.target_parameters or [] if t.rsplit(".", 1)[-1] in experts}
        if not present:
            raise ValueError(f"{source}: no q/k/v/o/gate/up/down projection or fused expert weights to import")
        inject = LoraConfig(r=hf_config.r, alpha=hf_config.alpha, dropout=hf_config.dropout,
                            target_modules=rf"(.*\.)?layers\.\d+\.({'|'.join(sorted(present))})",
                            use_rslora=hf_config.use_rslora)
        apply_lora_to_megatron_model(chunks, inject, adapter_name, log=False)
        injected = True
    try:
        plan = []
        used: set[str] = set()
        local_layers = set()
        for info, layer in module_infos(chunks, adapter_name):
            local_layers.add(info.layer)
            got = from_hf_adapter(info, hf_config, tensors, source)
            if got is None:  # the adapter does not touch this layer: a no-op here
                plan.append((layer, None, torch.zeros_like(layer.lora_B[adapter_name].weight), info.alpha))
                continue
            if info.role in EXPERT_PARAMS:
                used.update(expert_wrapper_keys(info, hf_config, tensors) or ())
            else:
                for projection in HF_NAMES[info.role][1]:
                    used.update({f"{hf_module(info, projection)}.lora_A.weight",
                                 f"{hf_module(info, projection)}.lora_B.weight"})
            a, b, r, alpha = got
            if r != layer.r[adapter_name]:
                raise ValueError(f"{source}: rank {r} for {info.key}, but the model's adapter '{adapter_name}' has "
                                 f"rank {layer.r[adapter_name]}")
            plan.append((layer, layer.shard("lora_A", a), layer.shard("lora_B", b), alpha))
        pipeline = _parallel_ranks()["pp_size"] > 1
        extra = []
        for key in sorted(set(tensors) - used):
            found = re.match(r"model\.layers\.(\d+)\.", key)
            if pipeline and found and int(found.group(1)) not in local_layers:
                continue  # another pipeline stage's layer
            extra.append(key)
        if extra:
            raise ValueError(f"{source}: weights with no Megatron LoRA layer in this model, e.g. {extra[:5]}")
    except ValueError:
        if injected:
            for chunk in chunks:
                if adapter_name in adapter_configs(chunk):
                    delete_adapter(chunk, adapter_name)
        raise
    with torch.no_grad():
        for layer, a, b, alpha in plan:
            if a is not None:
                layer.lora_A[adapter_name].weight.copy_(a)
            layer.lora_B[adapter_name].weight.copy_(b)
            if alpha != layer.lora_alpha[adapter_name] or hf_config.use_rslora != layer.use_rslora[adapter_name]:
                layer.set_scale(adapter_name, alpha, hf_config.use_rslora)
            layer.set_dropout(adapter_name, hf_config.dropout)
    for chunk in chunks:
        set_adapter_trainable(chunk, adapter_name, trainable)
    return hf_config
