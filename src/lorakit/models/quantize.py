"""Quantizing a base model's linear layers (the ``quantization`` run-config key), calling ``lorakit.lora.quant``.

transformers' ``BitsAndBytesConfig`` does the same on GPUs; this works wherever bitsandbytes runs
(its CPU backend included) and on any model, and keeps the output head in full precision.

The split rule: ``lorakit.lora.quant`` is the one place that knows bitsandbytes' specifics (it
recognises, reads, builds and dequantizes its layers) and never imports the package. This module
is the step above it: it imports bitsandbytes through ``lorakit.extras.require`` (one line naming
``pip install 'lorakit[quant]'`` when it is missing), hands the module to the core, and applies the
QLoRA rule to the LoRA targets. It uses nothing of bitsandbytes' API itself.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..extras import require
from ..lora import quant
from ..lora.quant import QUANT_TYPES, base_memory_bytes

__all__ = ["QUANT_TYPES", "base_memory_bytes", "check_quantized_targets", "quantize_model"]


def quantize_model(model: nn.Module, kind: str, compute_dtype: torch.dtype = torch.float32,
                   skip: Sequence[str] = ("lm_head",), device: Optional[torch.device] = None) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (but the output head) by a bitsandbytes layer, in place.

    ``lorakit.lora.quant.quantize_model`` with bitsandbytes imported here (see it for the arguments).

    Raises:
        MissingExtra: bitsandbytes is not importable (the message names ``pip install 'lorakit[quant]'``).
    """
    if kind not in QUANT_TYPES:
        raise ValueError(f"quantization must be one of {list(QUANT_TYPES)}, got {kind!r}")
    bnb = require("bitsandbytes", "quant", f"quantization: {kind}")
    return quant.quantize_model(model, kind, bnb, compute_dtype=compute_dtype, skip=skip, device=device)


def check_quantized_targets(model: nn.Module, config, kind: str) -> None:
    """Refuse LoRA targets QLoRA does not cover: every target must be a Linear layer.

    Raises:
        ValueError: naming ``quantization``, ``lora.target_modules`` and the first offending module.
    """
    from ..lora.targets import plan_injection

    targets, _ = plan_injection(model, config, "default")
    for target in targets:
        if not isinstance(target.module, nn.Linear):
            raise ValueError(
                f"quantization: {kind} with lora.target_modules={config.target_modules!r}: module '{target.path}' is a "
                f"{type(target.module).__name__}, not a linear layer; QLoRA trains LoRA on the quantized linear layers, "
                "so leave it out of lora.target_modules (or drop quantization)")
