"""Everything lorakit knows about bitsandbytes, in one place; the core never imports bitsandbytes.

QLoRA (Dettmers et al., 2023) keeps the base model's linear layers in 4-bit NormalFloat with
double quantisation and trains LoRA adapters on top in a higher precision. LoRA wraps a
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` like any Linear (they subclass ``nn.Linear``): the
base layer's own dequantizing forward runs and the adapter adds its update.

The split rule: this module is the one place that knows bitsandbytes' specifics (its class
names, ``quant_type`` / ``compute_dtype`` / ``quant_state``, how its layers are built and moved,
its CPU backend's quirks, the ``is_loaded_in_4bit`` flags transformers and PEFT read). It
recognises bitsandbytes layers by their class and never imports the package: the one function
that builds layers, ``quantize_model``, is handed the imported ``bitsandbytes`` module by its
caller. ``lorakit.models.quantize`` is that caller (the ``quantization`` run-config key): it
checks the ``[quant]`` extra is installed (one-line error naming the pip command), applies the
QLoRA target rule, and calls in here; it knows nothing of bitsandbytes' API.

- recognising quantized layers (``is_quantized``, ``quantization_of``, ``model_quantization``);
- ``dequantized_weight`` reads a layer's weight as a float matrix (DoRA's norm, merging), and
  ``compute_dtype`` the dtype its forward takes (DoRA's base product);
- ``dequantize_model`` swaps them for ``nn.Linear`` in a chosen dtype: merging a LoRA into a
  quantized base goes through it (adding a low-rank update to 4-bit codes would lose most of it);
- ``quantize_model`` builds them from a float model; ``base_memory_bytes`` counts what they hold.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence

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


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype to feed a layer whose own forward computes the product: a bitsandbytes 4-bit layer's
    ``compute_dtype`` (float32 when unset, and for layers without one)."""
    return getattr(module, "compute_dtype", None) or torch.float32


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
    dtype = compute_dtype(module)
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


def quantize_model(model: nn.Module, kind: str, bnb: ModuleType, compute_dtype: torch.dtype = torch.float32,
                   skip: Sequence[str] = ("lm_head",), device: Optional[torch.device] = None) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (but the output head) by a bitsandbytes layer, in place.

    Args:
        model: a float model (weights on CPU or ``device``).
        kind: ``"nf4"`` (with double quantisation, as QLoRA), ``"fp4"`` or ``"int8"`` (LLM.int8).
        bnb: the imported ``bitsandbytes`` module (``lorakit.models.quantize`` imports it, with
            the install hint when it is missing; the core never imports it).
        compute_dtype: dtype the 4-bit layers dequantize to for their matmul.
        skip: leaf names kept in full precision (the output head, like transformers does).
        device: where the quantized weights live (default: where each weight is).

    Returns:
        The paths of the quantized layers.
    """
    if kind not in QUANT_TYPES:
        raise ValueError(f"quantization must be one of {list(QUANT_TYPES)}, got {kind!r}")
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
