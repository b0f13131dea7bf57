"""Which attention kernel a run uses (train.attn_implementation), and whether it can train on
padding-free micro-batches.

A padding-free micro-batch concatenates its samples into one row with position_ids restarting at
each sample. Some kernels keep the samples apart without building a dense (T, T) mask over the
whole concatenation: flash-attention's varlen path (sequence boundaries from the position_ids) and
flex attention (a block-sparse document mask). transformers' sdpa would build that dense mask, so
the recipes switch an sdpa model to lorakit's packed sdpa (``models.packed_attention``, sdpa on each
sample alone; ``training.setup.choose_padding_free``); eager gets padded batches.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

ATTENTION_KERNELS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
VARLEN_KERNELS = ("flash_attention_2", "flex_attention")
"""Kernels that keep concatenated samples apart without a dense mask."""


@dataclass
class AttentionChoice:
    """The kernel a run uses and why."""

    implementation: str
    """The transformers ``attn_implementation``."""
    reason: str
    """Why this one (for the log)."""

    @property
    def padding_free_capable(self) -> bool:
        return self.implementation in VARLEN_KERNELS


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(spec: str, device: torch.device, dtype: torch.dtype, key: str = "train.attn_implementation") -> AttentionChoice:
    """Turn ``train.attn_implementation`` into a kernel this machine has.

    Raises:
        ValueError: an explicit kernel that is not installed or cannot run here (names the key and
            what to do instead). Raised before any weight is loaded.
    """
    if spec not in ATTENTION_KERNELS:
        raise ValueError(f"{key}: unknown kernel {spec!r}; choose one of {', '.join(ATTENTION_KERNELS)}")
    half = dtype in (torch.float16, torch.bfloat16)
    if spec == "auto":
        if device.type == "cuda" and half and _flash_attn_installed():
            return AttentionChoice("flash_attention_2", "auto: flash-attn is installed and the run is on CUDA in "
                                   f"{str(dtype).removeprefix('torch.')}")
        why = ("flash-attn is not installed" if device.type == "cuda" and half else
               "flash-attention needs a CUDA GPU in bf16/fp16" if not _flash_attn_installed() or not half else
               "flash-attention needs a CUDA GPU")
        return AttentionChoice("sdpa", f"auto: {why}; PyTorch's scaled_dot_product_attention")
    if spec == "flash_attention_2":
        if not _flash_attn_installed():
            raise ValueError(f"{key}=flash_attention_2: the flash-attn package is not installed (pip install flash-attn "
                             "--no-build-isolation, on a CUDA machine); use auto or sdpa")
        if device.type != "cuda":
            raise ValueError(f"{key}=flash_attention_2 needs a CUDA GPU (this run is on {device.type}); use auto or sdpa")
        if not half:
            raise ValueError(f"{key}=flash_attention_2 computes in bf16/fp16 only; set train.dtype: bf16 (or fp16), "
                             "or use sdpa")
    if spec == "flex_attention":
        if not _flex_available():
            raise ValueError(f"{key}=flex_attention needs torch.nn.attention.flex_attention (torch >= 2.5); use auto or sdpa")
        if device.type != "cuda":
            raise ValueError(f"{key}=flex_attention cannot train on {device.type}: PyTorch's flex attention has no "
                             "backward pass there; use auto or sdpa (or run on a CUDA GPU)")
    return AttentionChoice(spec, "as configured")


def isolation_tolerance(dtype: torch.dtype) -> float:
    """Relative/absolute tolerance for comparing a packed sample's logits with the sample alone,
    fitting the dtype the model computes in: attention over a longer row adds rounding, never more
    than a few units of the dtype's precision; a leak between samples changes logits by O(1)."""
    return {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-3)
