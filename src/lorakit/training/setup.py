"""The start every recipe shares: device and dtype, the (demo) base model, its tokenizer, the run dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig, dump_config
from ..distributed import DistInfo
from ..models import DEMO, DEMO_MOE, demo_model_dir, load_model, load_tokenizer, resolve_dtype


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


def start_run(cfg: RunConfig, info: DistInfo, device: torch.device, log: Callable[[str], None]) -> RunStart:
    """Resolve device and dtype, load tokenizer and base (``demo``: the cached demo model), record the config."""
    if info.mode != "none" and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if not info.main:
        log = lambda _message: None  # noqa: E731 - rank 0 logs, writes metrics and files
    dtype = resolve_dtype(cfg.train.dtype, device)
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("train.dtype=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if cfg.model in (DEMO, DEMO_MOE) and not demo_model_dir(cfg.model == DEMO_MOE).exists():
        log(f"Building lorakit's demo model in {demo_model_dir(cfg.model == DEMO_MOE)} (once; later runs reuse it)")
    tokenizer = load_tokenizer(cfg.model)
    base_dtype = dtype if device.type == "cuda" else torch.float32
    if cfg.quantization:
        from ..lora import LoraConfig
        from ..models.quantize import check_quantized_targets, quantize_model

        # Loaded on the CPU and quantized layer by layer as each moves to the device: the device
        # never holds the unquantized base.
        model = load_model(cfg.model, dtype=base_dtype)
        quantized = quantize_model(model, cfg.quantization, compute_dtype=base_dtype, device=device)
        model.to(device)
        log(f"Quantized {len(quantized)} linear layers of the base to {cfg.quantization} (bitsandbytes)")
        lora = LoraConfig.from_json(cfg.init_adapter) if cfg.init_adapter else cfg.lora.to_lora_config()
        check_quantized_targets(model, lora, cfg.quantization)
    else:
        model = load_model(cfg.model, dtype=base_dtype, device=device)
    if info.main:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return RunStart(device, dtype, tokenizer, model, log)
