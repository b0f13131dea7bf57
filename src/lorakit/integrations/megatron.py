"""Megatron-core backend: tensor-parallel LoRA on a Megatron model, its checkpoints, and HF export.

megatron-core is an optional extra (``pip install 'lorakit[megatron]'``) imported lazily: this
module imports it only inside the functions that need it.

```python
from lorakit import LoraConfig
from lorakit.integrations.megatron import (apply_lora_to_megatron_model, save_megatron_lora,
                                           load_megatron_lora, export_hf_adapter)

model = get_model(model_provider)          # list of model chunks (virtual pipeline), before DDP
apply_lora_to_megatron_model(model, LoraConfig(r=16, alpha=32, target_modules=[
    "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]))
...                                        # train: only LoRA weights require grad
save_megatron_lora(model, "ckpt/lora")     # every TP/PP rank writes its shards
export_hf_adapter(model, "out/adapter")    # gathered, q/k/v and gate/up split: PEFT / vLLM format
```

The seeds' flags (``--use-lora --lora-r --lora-alpha --lora-dropout --lora-target-modules``) come
from :func:`add_lora_arguments`; ``apply_lora_to_megatron_model(model, args)`` accepts the parsed
args too, and :func:`custom_megatron_init` is the ``--custom-megatron-init-path`` hook.

Offline: ``python -m lorakit.integrations.megatron export CKPT_DIR OUT_DIR`` turns a checkpoint
written by :func:`save_megatron_lora` (any TP size) into an HF PEFT adapter without Megatron.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ..lora.config import ALL_LINEAR, LoraConfig
from ..lora.inject import (
    _replace,
    adapter_configs,
    is_target,
    iter_modules,
    lora_modules,
    mark_trainable,
    set_active_adapters,
)
from ..lora.io import read_adapter, write_adapter
from ..lora.layer import check_adapter_name
from ..lora.parallel import COLUMN, ROW, ParallelLoraLinear, group_rank, group_size, shard_tensor, unshard_tensor
from .megatron_hf import ModuleInfo, from_hf_adapter, role_of, to_hf_adapter

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
META_NAME = "lora_meta.json"
SHARD_NAME = "adapter_shard.safetensors"
# Wrappers around a model chunk (Megatron's DDP and mixed-precision wrappers, torch's DDP).
_CHUNK_WRAPPERS = ("DistributedDataParallel", "Float16Module", "FullyShardedDataParallel", "OptimizedModule")
_TE_COLUMN = ("TEColumnParallelLinear", "TELayerNormColumnParallelLinear")
_TE_ROW = ("TERowParallelLinear",)

Chunks = Union[nn.Module, Sequence[nn.Module]]


def _require_megatron() -> None:
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        raise ImportError(
            "megatron-core is not installed; install lorakit's extra: pip install 'lorakit[megatron]'"
        ) from None


# --- model chunks and layers --------------------------------------------------------------------
def model_chunks(model: Chunks) -> list[nn.Module]:
    """The bare chunks of a Megatron model: a list (virtual pipeline) or one module, wrappers removed."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        while type(chunk).__name__ in _CHUNK_WRAPPERS and isinstance(getattr(chunk, "module", None), nn.Module):
            chunk = chunk.module
        while type(chunk).__name__ == "OptimizedModule" and hasattr(chunk, "_orig_mod"):
            chunk = chunk._orig_mod
        out.append(chunk)
    return out


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


@dataclass
class ParallelSpec:
    """How a Megatron linear layer is split across tensor-parallel ranks."""

    parallel_mode: str
    in_features: int
    out_features: int
    tp_group: Optional[dist.ProcessGroup]
    sequence_parallel: bool
    fused_norm: bool = False


def parallel_spec(path: str, module: nn.Module) -> Optional[ParallelSpec]:
    """The split of a Megatron (or Transformer Engine) parallel linear layer; None for other modules.

    Raises:
        ValueError: a parallel layer in a configuration the LoRA wrapper does not handle (naming it).
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    names = _class_names(module)
    kind = type(module).__name__
    if isinstance(module, ColumnParallelLinear):
        if module.gather_output:
            raise ValueError(f"'{path}' ({kind}) gathers its output (gather_output=True); LoRA supports the "
                             "split output of the transformer layers' column-parallel linears")
        if module.weight is None:
            raise ValueError(f"'{path}' ({kind}) has no weight of its own (skip_weight_param_allocation)")
        return ParallelSpec(COLUMN, module.input_size, module.output_size, module.tp_group,
                            module.sequence_parallel and not module.explicit_expert_comm)
    if isinstance(module, RowParallelLinear):
        if not module.input_is_parallel:
            raise ValueError(f"'{path}' ({kind}) takes an unsplit input (input_is_parallel=False); LoRA supports "
                             "the split input of the transformer layers' row-parallel linears")
        if module.explicit_expert_comm:
            raise ValueError(f"'{path}' ({kind}) is an expert layer with explicit communication (MoE): not supported")
        return ParallelSpec(ROW, module.input_size, module.output_size, module.tp_group, module.sequence_parallel)
    te_mode = None
    if names & set(_TE_COLUMN):
        te_mode = COLUMN
    elif names & set(_TE_ROW):
        te_mode = ROW
    if te_mode is None:
        return None
    # Transformer Engine layers (untested here: TE needs CUDA): full sizes are in_features /
    # out_features, the split is parallel_mode, the group tp_group.
    if getattr(module, "parallel_mode", te_mode) != te_mode:
        raise ValueError(f"'{path}' ({kind}) has parallel_mode={module.parallel_mode!r}, expected {te_mode!r}")
    return ParallelSpec(
        te_mode, int(module.in_features), int(module.out_features), getattr(module, "tp_group", None),
        bool(getattr(module, "sequence_parallel", False)), fused_norm="TELayerNormColumnParallelLinear" in names,
    )


class MegatronLoraLinear(ParallelLoraLinear):
    """:class:`ParallelLoraLinear` plus what Megatron expects of its modules (dist checkpointing)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        """Megatron distributed-checkpoint entries: the base layer's under its own (pre-LoRA) keys,
        so a base checkpoint and this model share them, plus the LoRA shards."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = dict(self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata))
        lora = {}
        axes = {}
        for which, store in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            for name, linear in store.items():
                key = f"{which}.{name}.weight"
                lora[key] = linear.weight
                if self.sharded[which] is not None:
                    axes[key] = self.sharded[which]
        kwargs = {}
        if metadata is not None and "dp_cp_group" in metadata:
            kwargs["dp_cp_group"] = metadata["dp_cp_group"]
        sharded = make_sharded_tensors_for_checkpoint(lora, prefix, axes, sharded_offsets, tp_group=self.tp_group, **kwargs)
        if self.partition_stride == 2:
            # SwiGLU's fc1: B's rows are [gate_i; up_i] per rank; save them as Megatron saves the
            # fc1 weight itself (gate and up sharded separately), so any TP size reloads them.
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            singleton = bool((metadata or {}).get("singleton_local_shards", False))
            for key in [k for k in sharded if ".lora_B." in k]:
                sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        out.update(sharded)
        return out


class NormedInputLoraLinear(MegatronLoraLinear):
    """LoRA on Transformer Engine's ``LayerNormLinear`` (norm fused into the linear): the LoRA branch
    reads the normalised input, recomputed here from the layer's own norm weights."""

    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        weight = base.layer_norm_weight
        if getattr(base, "zero_centered_gamma", False):
            weight = weight + 1
        xf = x.float()
        if getattr(base, "normalization", "LayerNorm") == "RMSNorm":
            out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + base.eps) * weight.float()
        else:
            bias = getattr(base, "layer_norm_bias", None)
            out = torch.nn.functional.layer_norm(
                xf, (xf.shape[-1],), weight.float(), None if bias is None else bias.float(), base.eps)
        return out.to(x.dtype)


def _stride(path: str, module: nn.Module) -> int:
    # SwiGLU's linear_fc1 holds [gate_i; up_i] on rank i (MLP.glu chunks the local output in two):
    # its output is split with stride 2 whatever the init recorded.
    config = getattr(module, "config", None)
    if path.rsplit(".", 1)[-1] == "linear_fc1" and getattr(config, "gated_linear_unit", False):
        return 2
    return int(getattr(getattr(module, "weight", None), "partition_stride", 1) or 1)


def _candidates(chunk: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for path, module in iter_modules(chunk):
        if isinstance(module, ParallelLoraLinear) or _class_names(module) & {
            "ColumnParallelLinear", "RowParallelLinear", *_TE_COLUMN, *_TE_ROW}:
            out.append((path, module))
    return out


def _resolve_targets(config: LoraConfig, candidates: list[tuple[str, nn.Module]]) -> Union[list[str], str]:
    if config.target_modules != ALL_LINEAR:
        return config.target_modules
    # "all-linear" on Megatron: every parallel linear but the output layer (the LM head).
    return sorted({p.rsplit(".", 1)[-1] for p, _ in candidates} - {"output_layer"})


def _nothing_matched(config: LoraConfig, chunks: list[nn.Module]) -> str:
    leaves: dict[str, str] = {}
    for chunk in chunks:
        for path, module in _candidates(chunk):
            leaves.setdefault(path.rsplit(".", 1)[-1], f"{path}: {type(module).__name__}")
    listing = "; ".join(f"{leaf} (e.g. {example})" for leaf, example in list(leaves.items())[:20])
    return (f"LoraConfig.target_modules={config.target_modules!r} matched no tensor-parallel linear layer. "
            f"Available: {listing or 'none: no ColumnParallelLinear/RowParallelLinear in the model'}")


def _mark_parallel(layer: ParallelLoraLinear, adapter_name: str) -> None:
    # Megatron's grad-norm and parameter counting read these attributes: a sharded LoRA weight is
    # tensor-parallel, a replicated one is a TP duplicate (counted on TP rank 0 only).
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for which, store in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
        dim = layer.sharded[which]
        if dim is not None:
            stride = layer.partition_stride if which == "lora_B" else 1
            set_tensor_model_parallel_attributes(store[adapter_name].weight, True, dim, stride)


def apply_lora_to_megatron_model(
    model: Chunks,
    lora_config: Union[LoraConfig, argparse.Namespace],
    adapter_name: str = "default",
    dtype: Optional[torch.dtype] = None,
    log: bool = True,
) -> Chunks:
    """Wrap the targeted parallel linear layers of every model chunk with LoRA, in place.

    Call it on every rank right after the model is built, before Megatron's DDP wrapper and the
    optimizer are created (they must see which parameters require grad). Afterwards only the
    LoRA weights of ``adapter_name`` require grad. A collective: every rank of the job calls it.

    Args:
        model: the list of model chunks (virtual pipeline) or one chunk; DDP/Float16 wrappers are
            looked through.
        lora_config: the adapter's config, with Megatron's module names as targets
            (``linear_qkv linear_proj linear_fc1 linear_fc2``; "all-linear" = every parallel
            linear but ``output_layer``), or the seeds' parsed args (``--lora-r`` ...).
        adapter_name: name of the adapter (several can live in one model).
        dtype: dtype of the LoRA weights; default: float32 for fp16/bf16 bases, else the base's.
        log: print the seed-style report on global rank 0 (model-wide counts and rank 0's own);
            every rank logs its own counts at INFO level.

    Returns:
        ``model``, as passed (the seeds' ``model = apply_lora_to_megatron_model(model, args)``).

    Raises:
        ValueError: nothing matched (listing the available parallel linear layers), or a matched
            module is not a parallel linear layer LoRA can wrap.
    """
    _require_megatron()
    config = lora_config if isinstance(lora_config, LoraConfig) else lora_config_from_args(lora_config)
    check_adapter_name(adapter_name)
    chunks = model_chunks(model)
    plans = []
    for index, chunk in enumerate(chunks):
        candidates = _candidates(chunk)
        names = _resolve_targets(config, candidates)
        plan = []
        for path, module in iter_modules(chunk):
            if not is_target(path, config, names):
                continue
            if isinstance(module, ParallelLoraLinear):
                if adapter_name in module.r:
                    raise ValueError(f"adapter '{adapter_name}' already exists on '{path}' (model chunk {index})")
                plan.append((path, module, None))
                continue
            spec = parallel_spec(path, module)
            if spec is None:
                if isinstance(module, nn.Linear):
                    continue  # a plain Linear inside a matched name (e.g. a router); not a TP layer
                raise ValueError(
                    f"module '{path}' (model chunk {index}) matches target_modules but is a {type(module).__name__}; "
                    "Megatron LoRA wraps ColumnParallelLinear / RowParallelLinear and their Transformer Engine versions"
                )
            plan.append((path, module, spec))
        plans.append((chunk, names, plan))
    if not any(plan for _, _, plan in plans):
        raise ValueError(_nothing_matched(config, chunks))

    for chunk, names, plan in plans:
        for path, module, spec in plan:
            layer = module
            if spec is not None:
                cls = NormedInputLoraLinear if spec.fused_norm else MegatronLoraLinear
                layer = cls(module, parallel_mode=spec.parallel_mode, in_features=spec.in_features,
                            out_features=spec.out_features, tp_group=spec.tp_group,
                            sequence_parallel=spec.sequence_parallel, partition_stride=_stride(path, module))
                _replace(chunk, path, layer)
            weight = layer.base_layer.weight
            lora_dtype = dtype or (torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype)
            layer.add_adapter(adapter_name, config.rank_for(path), config.alpha_for(path), config.dropout,
                              config.use_rslora, config.init_lora_weights, dtype=lora_dtype)
            _mark_parallel(layer, adapter_name)
        stored = dataclasses.replace(config, target_modules=names) if config.target_modules == ALL_LINEAR else config
        adapter_configs(chunk)[adapter_name] = stored
        if plan:
            set_active_adapters(chunk, [adapter_name])
        mark_trainable(chunk, adapter_name)
    if log:
        report = megatron_lora_report(model, config)
        logger.info("%s", report.rank_line())
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(report, flush=True)
    return model


# --- report ------------------------------------------------------------------------------------
@dataclass
class MegatronLoraReport:
    """Parameter counts of a Megatron LoRA model, on this rank and over the whole model."""

    config: Optional[LoraConfig]
    wrapped: list[str]
    rank: int
    rank_total: int
    rank_trainable: int
    global_total: int
    global_trainable: int

    @staticmethod
    def _pct(part: int, whole: int) -> float:
        return 100.0 * part / whole if whole else 0.0

    def rank_line(self) -> str:
        return (f"rank {self.rank}: LoRA on {len(self.wrapped)} layers; parameters {self.rank_total:,}, "
                f"trainable {self.rank_trainable:,} ({self._pct(self.rank_trainable, self.rank_total):.4f}%)")

    def __str__(self) -> str:
        bar = "=" * 80
        lines = [bar, "LoRA applied to the Megatron model", bar]
        if self.config is not None:
            c = self.config
            targets = c.target_modules if isinstance(c.target_modules, str) else list(c.target_modules or [])
            lines += ["LoRA Configuration:", f"  - Rank (r): {c.r}", f"  - Alpha: {c.alpha:g}",
                      f"  - Dropout: {c.dropout:g}", f"  - Target modules: {targets}"]
        lines += [f"Applied LoRA to: {p}" for p in self.wrapped]
        lines += [
            bar,
            f"  - Total parameters: {self.global_total:,}",
            f"  - Trainable parameters: {self.global_trainable:,}",
            f"  - Trainable %: {self._pct(self.global_trainable, self.global_total):.4f}%",
            f"  - This rank ({self.rank}): {self.rank_total:,} parameters, {self.rank_trainable:,} trainable",
            bar,
        ]
        return "\n".join(lines)


def _model_parallel_group() -> Optional[dist.ProcessGroup]:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_model_parallel_group()
    return None


def megatron_lora_report(model: Chunks, config: Optional[LoraConfig] = None) -> MegatronLoraReport:
    """Count this rank's parameters and the model's (summed over TP and PP ranks: a collective).

    Global counts take a TP-replicated parameter once (Megatron's ``tensor_model_parallel``
    attribute marks the split ones); data-parallel replicas are not counted again.
    """
    chunks = model_chunks(model)
    tp_rank = 0
    wrapped = []
    total = trainable = unique_total = unique_trainable = 0
    for index, chunk in enumerate(chunks):
        for path, layer in lora_modules(chunk):
            wrapped.append(path if len(chunks) == 1 else f"model{index}.{path}")
            if isinstance(layer, ParallelLoraLinear):
                tp_rank = layer.tp_rank
        for p in chunk.parameters():
            n = p.numel()
            total += n
            trainable += n if p.requires_grad else 0
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                unique_total += p.numel()
                unique_trainable += p.numel() if p.requires_grad else 0
    global_total, global_trainable = unique_total, unique_trainable
    if dist.is_initialized():
        counts = torch.tensor([unique_total, unique_trainable], dtype=torch.float64)
        dist.all_reduce(counts, group=_model_parallel_group())
        global_total, global_trainable = int(counts[0]), int(counts[1])
    rank = dist.get_rank() if dist.is_initialized() else 0
    return MegatronLoraReport(config, wrapped, rank, total, trainable, global_total, global_trainable)


# --- the seeds' flags ---------------------------------------------------------------------------
def add_lora_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the seeds' LoRA flags to a Megatron argument parser (``extra_args_provider``)."""
    group = parser.add_argument_group("lora")
    group.add_argument("--use-lora", action="store_true", help="Wrap the model with LoRA after it is built")
    group.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    group.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="Dropout on the LoRA branch input")
    group.add_argument("--lora-target-modules", type=str, nargs="+", default=list(DEFAULT_TARGETS),
                       help="Megatron module names to wrap (default: linear_qkv linear_proj linear_fc1 linear_fc2)")
    group.add_argument("--lora-only-trainable", action="store_true", default=True,
                       help="Accepted for the seeds' scripts: only LoRA weights are ever trained")
    group.add_argument("--lora-rslora", action="store_true", help="Scale by alpha / sqrt(r) (rsLoRA)")
    return parser


def lora_config_from_args(args: Any) -> LoraConfig:
    """A :class:`LoraConfig` from parsed seed flags (``args.lora_r`` ...); missing ones take the defaults."""
    targets = getattr(args, "lora_target_modules", None) or list(DEFAULT_TARGETS)
    if isinstance(targets, str):
        targets = [t for t in re.split(r"[,\s]+", targets) if t]
    try:
        return LoraConfig(r=int(getattr(args, "lora_r", 8)), alpha=float(getattr(args, "lora_alpha", 16.0)),
                          dropout=float(getattr(args, "lora_dropout", 0.0)), target_modules=list(targets),
                          use_rslora=bool(getattr(args, "lora_rslora", False)))
    except ValueError as err:
        raise ValueError(f"LoRA flags: {err}") from None


def custom_megatron_init(args: Any) -> Optional[LoraConfig]:
    """The seeds' ``--custom-megatron-init-path lorakit/integrations/megatron.py:custom_megatron_init``.

    Runs once the args are parsed, before the model exists: it checks the LoRA flags early (a bad
    rank fails here, not after the model is built) and leaves the config in ``args.lora_config``.
    The model is wrapped when it is built: ``apply_lora_to_megatron_model(model, args)`` after
    ``get_model``, or a model provider wrapped with :func:`lora_model_provider`.

    Returns:
        The config, or None without ``--use-lora``.
    """
    if not getattr(args, "use_lora", False):
        return None
    config = lora_config_from_args(args)
    args.lora_config = config
    return config


def lora_model_provider(provider: Callable[..., nn.Module], lora_config: Union[LoraConfig, Any]) -> Callable[..., nn.Module]:
    """Wrap a Megatron ``model_provider`` so each chunk gets LoRA as soon as it is built (before DDP)."""

    def wrapped(*args: Any, **kwargs: Any) -> nn.Module:
        chunk = provider(*args, **kwargs)
        apply_lora_to_megatron_model(chunk, lora_config)
        return chunk

    return wrapped


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


def module_infos(model: Chunks, adapter_name: str = "default") -> list[tuple[ModuleInfo, ParallelLoraLinear]]:
    """Every wrapped layer carrying ``adapter_name``, with what export needs to know about it."""
    out = []
    for index, chunk in enumerate(model_chunks(model)):
        for path, layer in lora_modules(chunk):
            if not isinstance(layer, ParallelLoraLinear) or adapter_name not in layer.r:
                continue
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
            )
            out.append((info, layer))
    return out


def _parallel_ranks() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tp": 0, "tp_size": 1, "pp": 0, "pp_size": 1, "dp": 0}
    return {"tp": ps.get_tensor_model_parallel_rank(), "tp_size": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_rank(), "pp_size": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_rank()}


def _pp_group() -> Optional[dist.ProcessGroup]:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group() if ps.model_parallel_is_initialized() else None


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
    if ranks["dp"] == 0:
        tensors = {}
        for info, layer in infos:
            tensors[f"{info.key}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().cpu().contiguous()
            tensors[f"{info.key}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().cpu().contiguous()
        folder = root / f"mp_rank_{ranks['tp']:02d}_{ranks['pp']:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        _atomic(folder / SHARD_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    # The meta lists every pipeline stage's layers: gather them to write one file.
    local = [info.to_dict() for info, _ in infos]
    if ranks["pp_size"] > 1:
        gathered: list[Any] = [None] * ranks["pp_size"]
        dist.all_gather_object(gathered, local, group=_pp_group())
        local = [item for part in gathered for item in part]
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        config = adapter_configs(chunks[0]).get(adapter_name) or next(
            adapter_configs(c)[adapter_name] for c in chunks if adapter_name in adapter_configs(c))
        meta = {"format": "lorakit-megatron-lora", "version": 1, "tp_size": ranks["tp_size"],
                "pp_size": ranks["pp_size"], "config": config.to_peft_dict(), "modules": local}
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        _atomic(root / META_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    _barrier()
    return root


def _atomic(target: Path, write: Callable[[str], Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_meta(root: Path) -> dict:
    meta_path = root / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root}: no {META_NAME}; not a (complete) checkpoint written by save_megatron_lora")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != "lorakit-megatron-lora":
        raise ValueError(f"{meta_path}: not a lorakit Megatron LoRA checkpoint")
    return meta


def _full_from_files(root: Path, meta: dict, pp: int, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Full (unsharded) LoRA tensors of pipeline stage ``pp`` from every TP rank's file."""
    shards = []
    for tp in range(meta["tp_size"]):
        file = root / f"mp_rank_{tp:02d}_{pp:03d}" / SHARD_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing shard of TP rank {tp}, PP rank {pp}")
        shards.append(load_file(str(file)))
    infos = {m["key"]: ModuleInfo(**m) for m in meta["modules"]}
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
    infos = module_infos(model, adapter_name)
    if not infos:
        raise ValueError(f"the model has no LoRA adapter '{adapter_name}'; inject it before loading its weights")
    wanted = {f"{i.key}.lora_{w}.weight" for i, _ in infos for w in "AB"}
    if meta["tp_size"] == ranks["tp_size"]:
        file = root / f"mp_rank_{ranks['tp']:02d}_{ranks['pp']:03d}" / SHARD_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing shard of TP rank {ranks['tp']}, PP rank {ranks['pp']}")
        tensors = load_file(str(file))
        resharded = False
    else:
        tensors = _full_from_files(root, meta, ranks["pp"], wanted)
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
    for pp in range(meta["pp_size"]):
        wanted = {f"{i.key}.lora_{w}.weight" for i in infos for w in "AB"}
        full = _full_from_files(root, meta, pp, wanted)
        for info in infos:
            key = f"{info.key}.lora_A.weight"
            if key in full:
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
    from ..lora.inject import delete_adapter
    from .megatron_hf import HF_NAMES, hf_module

    hf_config, tensors, source = read_adapter(path)
    chunks = model_chunks(model)
    injected = False
    if not module_infos(chunks, adapter_name):
        roles = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
                 "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2"}
        leaves = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}
        present = sorted({roles[leaf] for leaf in leaves if leaf in roles})
        if not present:
            raise ValueError(f"{source}: no q/k/v/o/gate/up/down projection weights to import")
        inject = LoraConfig(r=hf_config.r, alpha=hf_config.alpha, dropout=hf_config.dropout, target_modules=present,
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
            for projection in HF_NAMES[info.role][1]:
                used.update({f"{hf_module(info, projection)}.lora_A.weight", f"{hf_module(info, projection)}.lora_B.weight"})
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
        mark_trainable(chunk, adapter_name if trainable else None)
    return hf_config


# --- command line: offline export ----------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.integrations.megatron",
                                     description="Megatron-core LoRA checkpoints -> HF PEFT adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write an HF PEFT adapter from a save_megatron_lora checkpoint")
    export.add_argument("checkpoint", help="directory written by save_megatron_lora (holds lora_meta.json)")
    export.add_argument("output", help="adapter directory to write (adapter_config.json + adapter_model.safetensors)")
    export.add_argument("--base-model", default=None, help="base_model_name_or_path to record in the config")
    args = parser.parse_args(argv)
    try:
        out = export_hf_adapter_from_checkpoint(args.checkpoint, args.output, args.base_model)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "apply_lora_to_megatron_model", "add_lora_arguments", "lora_config_from_args", "custom_megatron_init",
    "lora_model_provider", "megatron_lora_report", "MegatronLoraReport", "save_megatron_lora",
    "load_megatron_lora", "load_base_checkpoint", "BaseLoadReport", "export_hf_adapter",
    "export_hf_adapter_from_checkpoint", "import_hf_adapter", "gather_lora", "module_infos",
    "MegatronLoraLinear", "NormedInputLoraLinear", "parallel_spec", "model_chunks", "shard_tensor",
    "group_rank", "group_size",
]
