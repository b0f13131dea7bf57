"""Load a causal LM and its tokenizer from a local HF directory (or a hub id where a network exists)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelError(ValueError):
    """The base model cannot be loaded; the message names it."""


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ModelError(f"device '{spec}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{spec}' requested but no CUDA device is available")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a CUDA device that supports it, fp32 otherwise."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[spec]


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ModelError(_explain(name, "tokenizer", err)) from None


def load_model(name: str, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with errors that say what went wrong."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelError(_explain(name, "model", err)) from None
    if device is not None:
        model.to(device)
    return model


def _explain(name: str, what: str, err: Exception) -> str:
    path = Path(name)
    if path.is_dir():
        return f"model '{name}': cannot load the {what} from this directory ({type(err).__name__}: {err})"
    if path.exists():
        return f"model '{name}': is a file; expected a Hugging Face model directory"
    return (f"model '{name}': no such directory, and it could not be fetched as a hub id "
            f"(no network, or no such repo). Create a local one with `lorakit demo-model DIR`.")
