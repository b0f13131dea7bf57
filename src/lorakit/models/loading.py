"""Load a causal LM and its tokenizer from a local HF directory, ``demo``, a GGUF file, a named real model, or a
hub id where a network exists."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .cache import is_cached
from .demo import DEMO, DEMO_MOE, demo_model_dir, ensure_demo_model
from .gguf import GgufError, ensure_gguf_model, is_gguf_name
from .named import NAMED_MODELS, NamedModelError, ensure_named_model

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


def resolve_model(name: str, log: Optional[Callable[[str], None]] = None) -> str:
    """Where to load model ``name`` from.

    - ``demo`` (``demo-moe``): lorakit's demo model (its MoE variant), cached, built on first use;
    - a named real model (``smollm2-135m-instruct``): the GGUF file its installed package ships,
      converted once into the cache;
    - a ``.gguf`` file: converted once into the cache (``models.gguf``);
    - an existing directory: itself;
    - anything else must look like a hub id ("org/name").

    Args:
        log: told when the model is about to be built or converted (slow, once); silent on a cache hit.

    Raises:
        ModelError: ``name`` is empty; a path (absolute, ``./``, ``~``, several parts) that does not
            exist; a GGUF file that cannot be used; a named model whose package is not installed.
            The message is one line naming the model and what to do.
    """
    name = os.fspath(name)  # a Path from Python callers (tests and users pass directories as Paths)
    if name in (DEMO, DEMO_MOE):
        moe = name == DEMO_MOE
        if log is not None and not is_cached(demo_model_dir(moe)):
            log(f"Building lorakit's demo model in {demo_model_dir(moe)} (once; later runs reuse it)")
        return str(ensure_demo_model(moe=moe))
    if not name:
        raise ModelError("model: no model given (a local Hugging Face model directory, a .gguf file, 'demo', or one "
                         f"of {', '.join(NAMED_MODELS)})")
    if name in NAMED_MODELS or is_gguf_name(name):
        try:
            if name in NAMED_MODELS:
                return str(ensure_named_model(name, log=log))
            return str(ensure_gguf_model(name, log=log))
        except (GgufError, NamedModelError) as err:
            raise ModelError(str(err)) from None
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    # A hub id is "name" or "org/name"; anything else can only be a local path, and a missing one is
    # a typo to report now, not a random or remote model to fall back on.
    if path.is_absolute() or name.startswith((".", "~")) or len(path.parts) > 2 or "\\" in name:
        raise ModelError(f"model '{name}': no such directory (lorakit's demo model is `model: demo`)")
    return name


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    name = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ModelError(_explain(name, "tokenizer", err)) from None


def load_model(name: str, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
               attn_implementation: Optional[str] = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with errors that say what went wrong."""
    from transformers import AutoModelForCausalLM

    name = resolve_model(name)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **extra)
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
        return f"model '{name}': is a file; expected a Hugging Face model directory or a .gguf file"
    return (f"model '{name}': no such directory, and it could not be fetched as a hub id "
            f"(no network, or no such repo). lorakit's demo model is `model: demo` (or --model demo).")
