"""Quantizing a base model's linear layers with bitsandbytes (the ``quantization`` run-config key).

transformers' ``BitsAndBytesConfig`` does the same on GPUs; this works wherever bitsandbytes runs
(its CPU backend included) and on any model, and keeps the output head in full precision.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..extras import require

QUANT_TYPES = ("nf4", "fp4", "int8")


def _require_bnb(kind: str = "nf4"):
    return require("bitsandbytes", "quant", f"quantization: {kind}")


def quantize_model(model: nn.Module, kind: str, compute_dtype: torch.dtype = torch.float32,
                   skip: Sequence[str] = ("lm_head",), device: Optional[torch.device] = None) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (but the output head) by a bitsandbytes layer, in place.

    Args:
        model: a float model (weights on CPU or ``device``).
        kind: ``"nf4"`` (with double quantisation, as QLoRA), ``"fp4"`` or ``"int8"`` (LLM.int8).
        compute_dtype: dtype the 4-bit layers dequantize to for their matmul.
        skip: leaf names kept in full precision (the output head, like transformers does).
        device: where the quantized weights live (default: where each weight is).

    Returns:
        The paths of the quantized layers.
    """
    if kind not in QUANT_TYPES:
        raise ValueError(f"quantization must be one of {list(QUANT_TYPES)}, got {kind!r}")
    bnb = _require_bnb(kind)
    done = []
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or path.split(".")[-1] in skip:
            continue
        dev = device or module.weight.device
        weight = module.weight.data.to("cpu", torch.float32)
        bias = module.bias
        if kind == "int8":
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=bias is not None,
                                      has_fp16_weights=False, threshold=0.0)
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=kind == "nf4", quant_type=kind)
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=kind == "nf4",
                                           quant_type=kind)
        if bias is not None:
            new.bias = nn.Parameter(bias.data.to("cpu", compute_dtype if kind != "int8" else bias.dtype),
                                    requires_grad=False)
        if kind != "int8":
            # bitsandbytes' CPU backend repacks a 4-bit weight for its AVX512-BF16 kernel the first
            # time the layer runs in eval mode without grad, and from then on every call (training
            # too) takes a kernel with no backward: the gradient to the layer input is silently
            # lost. Keep the layout that trains correctly (it also computes in fp32, not bf16).
            new.support_avx512bf16_for_cpu = False
        new = new.to(dev)  # moving a bitsandbytes layer is what quantizes it
        new.train(module.training)
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
        done.append(path)
    if not done:
        raise ValueError(f"quantization={kind}: {type(model).__name__} has no nn.Linear layer to quantize")
    model.is_loaded_in_4bit = kind != "int8"  # the flags transformers and PEFT read
    model.is_loaded_in_8bit = kind == "int8"
    return done


def base_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the base model's parameters and buffers (quantized codes and their statistics)."""
    total = 0
    for module in model.modules():
        for p in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            total += p.numel() * p.element_size()
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for t in (state.absmax, getattr(state, "code", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
            nested = getattr(state, "state2", None)
            if nested is not None and isinstance(nested.absmax, torch.Tensor):
                total += nested.absmax.numel() * nested.absmax.element_size()
    return total




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
