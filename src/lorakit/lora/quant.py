"""Quantized base layers (bitsandbytes), recognised lazily: the core never imports bitsandbytes.

QLoRA (Dettmers et al., 2023) keeps the base model's linear layers in 4-bit NormalFloat with
double quantisation and trains LoRA adapters on top in a higher precision. LoRA wraps a
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` like any Linear (they subclass ``nn.Linear``): the
base layer's own dequantizing forward runs and the adapter adds its update. What differs lives here:

- recognising such layers by their class (``is_quantized``, ``quantization_of``);
- ``dequantized_weight`` reads a layer's weight as a float matrix (DoRA's norm, merging);
- ``dequantize_model`` swaps them for ``nn.Linear`` in a chosen dtype: merging a LoRA into a
  quantized base goes through it (adding a low-rank update to 4-bit codes would lose most of it).

Quantizing a model (the ``quantization`` run-config key) is ``lorakit.models.quantize``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4", "int8")


def _bnb_class(module: nn.Module) -> Optional[str]:
    cls = type(module)
    if not cls.__module__.startswith("bitsandbytes"):
        return None
    return cls.__name__


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    return _bnb_class(module) in ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")


def quantization_of(module: nn.Module) -> Optional[str]:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a quantized layer, else None."""
    if not is_quantized(module):
        return None
    if _bnb_class(module) == "Linear8bitLt":
        return "int8"
    return getattr(module.weight, "quant_type", None) or "nf4"


def model_quantization(model: nn.Module) -> Optional[str]:
    """The quantization of the first quantized layer of ``model`` (None: an unquantized model)."""
    for module in model.modules():
        kind = quantization_of(getattr(module, "base_layer", module))
        if kind is not None:
            return kind
    return None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float (out, in) matrix (a plain layer's weight as is, in its layout).

    A quantized layer is asked through its own forward pass, ``layer(I) - bias = W^T`` (in chunks
    of the identity), so this module never imports bitsandbytes and gets exactly the values the
    layer computes with (in its compute dtype).
    """
    if not is_quantized(module):
        return module.weight
    bias = getattr(module, "bias", None)
    device = bias.device if bias is not None else module.weight.device
    dtype = getattr(module, "compute_dtype", None) or torch.float32
    cols = []
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for start in range(0, module.in_features, 1024):
            stop = min(start + 1024, module.in_features)
            eye = torch.zeros(stop - start, module.in_features, dtype=dtype, device=device)
            eye[:, start:stop].fill_diagonal_(1.0)
            out = module(eye)
            cols.append(out - bias.to(out.dtype) if bias is not None else out)
    return torch.cat(cols, dim=0).T.contiguous()


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every bitsandbytes layer of ``model`` (also under LoRA wrappers) by ``nn.Linear`` in ``dtype``.

    Returns:
        The paths of the layers that were dequantized.
    """
    done = []
    for path, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        weight = dequantized_weight(module).to(dtype)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, dtype=dtype,
                           device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        linear.requires_grad_(False)
        linear.train(module.training)
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, linear)
        done.append(path)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return done


