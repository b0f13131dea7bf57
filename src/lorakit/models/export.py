"""Merge an adapter into its base and write a plain Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from ..lora.atomic import atomic_directory
from ..lora import load_adapter, merge_lora, unload_lora
from .loading import DTYPES, load_model, load_tokenizer


def export_merged(model_dir: Union[str, Path], adapter: Union[str, Path], out: Union[str, Path],
                  dtype: str = "fp32") -> float:
    """Write base + adapter, merged, to ``out`` (safetensors shards, config, tokenizer), atomically.

    The merge is computed in fp32 from an fp32 copy of the base, then cast once to ``dtype``.

    Returns:
        The largest absolute change the cast to ``dtype`` made to any merged weight (0 for fp32).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; pick a new output directory")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = load_model(str(model_dir), dtype=torch.float32)
    tokenizer = load_tokenizer(str(model_dir))
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
    plain.config.torch_dtype = target
    with atomic_directory(out) as staging:
        plain.save_pretrained(staging, max_shard_size="2GB")
        tokenizer.save_pretrained(staging)
    return error
