"""Megatron model chunks and their LoRA layers: finding the tensor-parallel linear layers,
wrapping them, counting parameters, and the seeds' ``--lora-*`` flags.

Part of ``lorakit.integrations.megatron`` (which re-exports everything public here); the
checkpoint and export side (``megatron_io``) builds on this module, never the reverse.
megatron-core is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from ..extras import require
from ..lora.config import ALL_LINEAR, LoraConfig
from ..lora.state import set_active_adapters
from ..lora.targets import is_target
from ..lora.trainable import set_adapter_trainable
from ..lora.tree import _replace, adapter_configs, iter_modules, lora_modules
from ..lora.layer import check_adapter_name
from ..lora.parallel import COLUMN, ROW, ParallelLoraLinear

logger = logging.getLogger("lorakit.integrations.megatron")

DEFAULT_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
# Wrappers around a model chunk (Megatron's DDP and mixed-precision wrappers, torch's DDP).
_CHUNK_WRAPPERS = ("DistributedDataParallel", "Float16Module", "FullyShardedDataParallel", "OptimizedModule")
_TE_COLUMN = ("TEColumnParallelLinear", "TELayerNormColumnParallelLinear")
_TE_ROW = ("TERowParallelLinear",)

Chunks = Union[nn.Module, Sequence[nn.Module]]


def _require_megatron() -> None:
    require("megatron.core", "megatron", "Megatron-core tensor parallelism")


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
    reduces_output: bool = True
    """False for a row-parallel MoE expert layer: the token dispatcher sums its partial outputs."""


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
            # An MoE expert's fc2 (SequentialMLP): no reduction inside the layer; the dispatcher
            # sums the expert-TP ranks' partial outputs when it combines the tokens.
            return ParallelSpec(ROW, module.input_size, module.output_size, module.tp_group, False,
                                reduces_output=False)
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


def _refuse_variants(config: LoraConfig) -> None:
    # DoRA's norm is per output feature over the whole input dimension: a RowParallelLinear holds
    # only a slice of each row, so it needs an all-reduce per step that this backend does not do.
    if config.use_dora:
        raise ValueError("use_dora: DoRA is not supported on Megatron tensor-parallel layers (each rank holds only part "
                         "of a weight row's norm); train DoRA with the HF backends (none/ddp) or set use_dora: false")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r}: PiSSA/OLoRA need the whole weight for the "
                         "SVD/QR and are not supported on Megatron tensor-parallel layers")


_GROUPED_EXPERTS = ("GroupedMLP", "TEGroupedMLP")


def _refuse_grouped_experts(chunk: nn.Module, index: int, config: LoraConfig, names: Union[list[str], str]) -> None:
    """Grouped-GEMM experts that the targets reach are refused, not skipped in silence.

    ``GroupedMLP`` runs its experts through the ``grouped_gemm`` CUDA kernels (its weights are one
    fused buffer per projection, with no layer to wrap) and ``TEGroupedMLP`` through Transformer
    Engine's grouped linears; neither builds on CPU, so LoRA for them is not written untested.
    """
    for path, module in iter_modules(chunk):
        if _class_names(module) & set(_GROUPED_EXPERTS) and not isinstance(module, ParallelLoraLinear):
            leaves = ("linear_fc1", "linear_fc2")
            wanted = sorted({*names, *leaves}) if config.target_modules == ALL_LINEAR else names
            reached = any(is_target(f"{path}.{leaf}", config, wanted) for leaf in leaves)
            if reached:
                raise ValueError(
                    f"'{path}' (model chunk {index}) is a {type(module).__name__}: grouped-GEMM MoE experts "
                    "(moe_grouped_gemm=True) are not supported by Megatron LoRA. Build the experts as SequentialMLP "
                    "(moe_grouped_gemm=False: same weights, and Megatron's distributed checkpoints are "
                    "interchangeable between the two), or keep the experts out of the targets "
                    "(exclude_modules: '.*\\.experts\\..*')"
                )


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
    # tensor-parallel, a replicated one is a TP duplicate (counted on TP rank 0 only). An expert's
    # weights carry allreduce=False under expert parallelism (Megatron's DDP then reduces them
    # over the expert-data-parallel group only): its LoRA weights are expert weights too.
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    allreduce = getattr(layer.base_layer.weight, "allreduce", None)
    for which, store in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
        if allreduce is not None:
            store[adapter_name].weight.allreduce = allreduce
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
    optimizer are created (they must see which parameters require grad). Afterwards the base is
    frozen and the LoRA weights of ``adapter_name`` require grad; other adapters keep theirs
    (``lorakit.lora.mark_trainable`` picks the trained set explicitly). A collective: every rank
    of the job calls it.

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
    _refuse_variants(config)
    chunks = model_chunks(model)
    plans = []
    for index, chunk in enumerate(chunks):
        candidates = _candidates(chunk)
        names = _resolve_targets(config, candidates)
        _refuse_grouped_experts(chunk, index, config, names)
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
                if "Router" in type(module).__name__:
                    raise ValueError(
                        f"module '{path}' (model chunk {index}) is Megatron's MoE router ({type(module).__name__}); "
                        "routers get no LoRA on this backend (vLLM serves none either): leave it out of target_modules"
                    )
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
                            sequence_parallel=spec.sequence_parallel, partition_stride=_stride(path, module),
                            reduces_output=spec.reduces_output)
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
        set_adapter_trainable(chunk, adapter_name, True)
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
    from megatron.core import parallel_state

    chunks = model_chunks(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    wrapped = []
    total = trainable = 0
    for index, chunk in enumerate(chunks):
        for path, layer in lora_modules(chunk):
            wrapped.append(path if len(chunks) == 1 else f"model{index}.{path}")
            if isinstance(layer, ParallelLoraLinear) and not parallel_state.model_parallel_is_initialized():
                tp_rank = layer.tp_rank
        for p in chunk.parameters():
            n = p.numel()
            total += n
            trainable += n if p.requires_grad else 0
    # Expert-parallel weights (Megatron marks them allreduce=False) differ between EP ranks: their
    # counts are summed over the expert-parallel group as well.
    counts = torch.zeros(4, dtype=torch.float64)
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                at = 2 if getattr(p, "allreduce", True) is False else 0
                counts[at] += p.numel()
                counts[at + 1] += p.numel() if p.requires_grad else 0
    if dist.is_initialized():
        dist.all_reduce(counts, group=_model_parallel_group())
        if parallel_state.model_parallel_is_initialized() and parallel_state.get_expert_model_parallel_world_size() > 1:
            experts = torch.cat([torch.zeros(2, dtype=torch.float64), counts[2:]])
            dist.all_reduce(experts, group=parallel_state.get_expert_model_parallel_group())
            counts[2:] = experts[2:]
    global_total, global_trainable = int(counts[0] + counts[2]), int(counts[1] + counts[3])
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
