"""Merge an adapter into its base and write a plain Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..extras import require
from ..lora.atomic import atomic_directory
from ..lora import load_adapter, merge_lora, unload_lora
from ..lora.quant import dequantize_model, model_quantization
from .loading import DTYPES, load_model, load_tokenizer


def export_merged(model_dir: Union[str, Path], adapter: Union[str, Path], out: Union[str, Path],
                  dtype: str = "fp32", quantization: Optional[str] = None,
                  log: Callable[[str], None] = lambda _m: None) -> float:
    """Write base + adapter, merged, to ``out`` (safetensors shards, config, tokenizer), atomically.

    The merge is computed in fp32 from an fp32 copy of the base, then cast once to ``dtype``.
    A QLoRA adapter was trained on the *quantized* base: with ``quantization`` (or a base directory
    saved quantized) the base is quantized as in training, dequantized to fp32, and merged there,
    so the merged model is the one the adapter was trained with.

    Returns:
        The largest absolute change the cast to ``dtype`` made to any merged weight (0 for fp32).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; pick a new output directory")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantization:
        require("bitsandbytes", "quant", f"--quantization {quantization}")
    model = load_model(str(model_dir), dtype=torch.float32)
    tokenizer = load_tokenizer(str(model_dir))
    if quantization:
        from .quantize import quantize_model

        quantize_model(model, quantization)
    kind = model_quantization(model)
    if kind is not None:
        layers = dequantize_model(model, torch.float32)
        log(f"The base is quantized ({kind}): dequantized {len(layers)} layers to fp32, merging in fp32, "
            f"writing {dtype}")
    load_adapter(model, adapter)
    merge_lora(model)
    plain = unload_lora(model, merge=True)
    target = DTYPES[dtype]
    error = 0.0
    with torch.no_grad():
        for p in plain.parameters():
            if p.is_floating_point() and target != torch.float32:
                error = max(error, (p - p.to(target).float()).abs().max().item())
    plain.to(target)
    plain.config.dtype = target  # transformers 5 name (torch_dtype is deprecated)
    with atomic_directory(out) as staging:
        plain.save_pretrained(staging, max_shard_size="2GB")
        tokenizer.save_pretrained(staging)
    return error
