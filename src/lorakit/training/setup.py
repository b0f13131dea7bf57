"""The start every recipe shares: device and dtype, the (demo) base model, its tokenizer, the run dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig, dump_config
from ..distributed import DistInfo, FsdpOptions
from ..extras import require
from ..models import load_model, load_tokenizer, resolve_dtype, resolve_model
from ..models.attention import AttentionChoice, resolve_attention


@dataclass
class RunStart:
    """What ``start_run`` hands the recipe."""

    device: torch.device
    """This rank's device (cuda:<local rank> under torchrun on GPUs)."""
    dtype: torch.dtype
    """Compute (autocast) dtype."""
    tokenizer: Any
    model: Any
    """The base model: in the compute dtype on GPU, fp32 on CPU (autocast does the rest)."""
    log: Callable[[str], None]
    """The recipe's log on rank 0, silent elsewhere: one voice."""
    attention: AttentionChoice
    """The attention kernel the model runs (train.attn_implementation resolved)."""
    fsdp: FsdpOptions
    """How ``wrap`` shards under FSDP2; ``fsdp.checkpoint`` is set when the base is still on meta
    (sharded loading): the recipe must call ``init_meta_adapters`` right after injecting LoRA, and
    load adapter values (``init_adapter``, a resumed checkpoint) after ``wrap``, into the shards."""

    @property
    def sharded_load(self) -> bool:
        return self.fsdp.checkpoint is not None


def start_run(cfg: RunConfig, info: DistInfo, device: torch.device, log: Callable[[str], None],
              sharded_load: bool = False) -> RunStart:
    """Resolve device and dtype, load tokenizer and base (``demo``, a GGUF file, a named model: the cached
    copy, built or converted on first use), record the config.

    ``sharded_load``: the recipe supports a base left on meta under FSDP2 (it calls
    ``init_meta_adapters`` after injecting LoRA and passes ``RunStart.fsdp`` to ``wrap``).
    """
    if info.mode != "none" and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if not info.main:
        log = lambda _message: None  # noqa: E731 - rank 0 logs, writes metrics and files
    dtype = resolve_dtype(cfg.train.dtype, device)
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("train.dtype=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    tc = cfg.train
    # Everything a user can get wrong is checked here, before any weight is read.
    if info.mode == "fsdp2" and info.world % tc.fsdp_replicate:
        fits = [n for n in range(1, info.world + 1) if info.world % n == 0]
        raise ValueError(f"train.fsdp_replicate={tc.fsdp_replicate} must divide the {info.world} ranks (HSDP: replica "
                         f"groups of equal size); with {info.world} ranks use one of {fits}")
    if info.mode == "fsdp2" and tc.fsdp_replicate > 1:
        log(f"HSDP: {tc.fsdp_replicate} replica groups x {info.world // tc.fsdp_replicate} ranks (parameters sharded "
            "within a group, gradients all-reduced across groups)")
    attention = resolve_attention(tc.attn_implementation, device, dtype)
    log(f"Attention: {attention.implementation} ({attention.reason})")
    fsdp = FsdpOptions(replicate=tc.fsdp_replicate if info.mode == "fsdp2" else 1, cpu_offload=tc.cpu_offload)
    if tc.cpu_offload and device.type != "cuda":
        log("Note: train.cpu_offload on a CPU run: FSDP2's offload policy is applied, but parameters already live in "
            "host memory, so it saves nothing here (it is for GPUs)")
    if cfg.quantization:
        require("bitsandbytes", "quant", f"quantization: {cfg.quantization}")
    resolve_model(cfg.model, log=log)  # builds the demo model or converts a GGUF file once, saying so
    tokenizer = load_tokenizer(cfg.model)
    base_dtype = dtype if device.type == "cuda" else torch.float32
    if cfg.quantization:
        from ..lora import LoraConfig
        from ..models.quantize import check_quantized_targets, quantize_model

        # Loaded on the CPU and quantized layer by layer as each moves to the device: the device
        # never holds the unquantized base.
        if info.mode == "fsdp2":
            from ..distributed.sharded_load import sharded_load_refusal

            log(f"Note: FSDP2 does not load this base sharded: {sharded_load_refusal(cfg)}")
        model = load_model(cfg.model, dtype=base_dtype, attn_implementation=attention.implementation)
        quantized = quantize_model(model, cfg.quantization, compute_dtype=base_dtype, device=device)
        model.to(device)
        log(f"Quantized {len(quantized)} linear layers of the base to {cfg.quantization} (bitsandbytes)")
        lora = LoraConfig.from_json(cfg.init_adapter) if cfg.init_adapter else cfg.lora.to_lora_config()
        check_quantized_targets(model, lora, cfg.quantization)
    else:
        meta = info.mode == "fsdp2" and sharded_load
        model = _meta_base(cfg, info, base_dtype, attention, fsdp, log) if meta else None
        if model is None:
            # A base FSDP2 cannot load sharded is loaded whole on the CPU, never the device: fully_shard
            # moves each rank's shards there and frees the rest.
            model = load_model(cfg.model, dtype=base_dtype, device=torch.device("cpu") if meta else device,
                               attn_implementation=attention.implementation)
    if info.main:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return RunStart(device, dtype, tokenizer, model, log, attention, fsdp)


def _meta_base(cfg: RunConfig, info: DistInfo, dtype: torch.dtype, attention: AttentionChoice, fsdp: FsdpOptions,
               log: Callable[[str], None]) -> Any:
    """The base on meta, for FSDP2 to shard before any rank reads a weight (None: load it whole,
    for the logged reason)."""
    from ..distributed.sharded_load import build_meta_model, checkpoint_index, mismatched_keys, sharded_load_refusal

    reason = sharded_load_refusal(cfg)
    index = None
    if reason is None:
        index = checkpoint_index(resolve_model(cfg.model))
        if index is None:
            reason = "the model directory holds no safetensors checkpoint (a rank reads its rows from safetensors files)"
    model = None
    if reason is None:
        model = build_meta_model(resolve_model(cfg.model), dtype, attention.implementation)
        missing = mismatched_keys(model, index)
        if missing:
            reason = (f"the checkpoint's tensors are not the model's own (e.g. {missing[0]}), so a rank cannot read its "
                      "rows of them")
            model = None
    if reason is not None:
        log(f"Note: FSDP2 loads the whole base into every rank's CPU memory (never the device) and fully_shard moves "
            f"each rank's shards to the device: {reason}")
        return None
    fsdp.checkpoint = index
    log(f"FSDP2: the base is built on meta and each rank will read only its shards of the "
        f"{index.nbytes / 2**20:,.1f} MiB checkpoint")
    return model


def choose_padding_free(run: RunStart, cfg: RunConfig, step_module: Any, info: DistInfo) -> bool:
    """Whether micro-batches go padding-free, logged with the reason; checks on the wrapped model
    that packed samples stay apart whenever samples share a row (packing or padding-free).

    With sdpa (the CPU default) the model switches to lorakit's packed sdpa
    (``models.packed_attention``): sdpa on each concatenated sample alone, so a micro-batch needs
    neither padding nor a dense mask over the concatenation.

    Raises:
        ValueError: train.packing on a model whose attention lets packed samples see each other.
    """
    from ..distributed import through_root
    from .loss import packed_attention_is_isolated

    tc, kernel = cfg.train, run.attention.implementation
    switched = (tc.packing or tc.padding_free) and kernel == "sdpa" and use_packed_sdpa(run.model)
    if switched:
        kernel = "sdpa one sample at a time"
    padding_free = tc.padding_free and (run.attention.padding_free_capable or switched)
    if tc.packing or padding_free:
        isolated = through_root(step_module, info, packed_attention_is_isolated)
        if not isolated and switched:  # back to transformers' own sdpa: padded, or packed with a dense mask
            run.model.set_attn_implementation("sdpa")
            kernel, padding_free = "sdpa", False
            isolated = not tc.packing or through_root(step_module, info, packed_attention_is_isolated)
        if not isolated:
            if tc.packing:
                raise ValueError(f"train.packing: {type(run.model).__name__}'s attention ({kernel}) does not keep packed "
                                 "samples apart (it ignores restarting position_ids); set train.packing=false")
            run.log(f"Note: {kernel} attention in this model cannot isolate concatenated samples; padding batches instead")
            return False
    if padding_free:
        run.log(f"Micro-batches: padding-free ({kernel} keeps concatenated samples apart without a dense mask)")
    elif tc.padding_free and not tc.packing:
        run.log(f"Micro-batches: padded ({kernel} would need a dense mask over the whole concatenation to keep "
                "samples apart; sdpa, flash_attention_2 or flex_attention run padding-free)")
    return padding_free


def use_packed_sdpa(model: Any) -> bool:
    """Switch an sdpa model to lorakit's packed sdpa; False (nothing changed) when the model does not
    take a custom attention kernel."""
    from ..models.packed_attention import register_packed_sdpa

    try:
        model.set_attn_implementation(register_packed_sdpa())
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return True
