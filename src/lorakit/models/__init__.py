"""Base models: load a HF causal LM + tokenizer; build lorakit's tiny demo model."""

from .demo import build_demo_model, build_demo_tokenizer, write_demo_model
from .loading import DTYPES, ModelError, load_model, load_tokenizer, resolve_device, resolve_dtype

__all__ = [
    "build_demo_model", "build_demo_tokenizer", "write_demo_model", "DTYPES", "ModelError",
    "load_model", "load_tokenizer", "resolve_device", "resolve_dtype",
]
