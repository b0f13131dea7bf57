"""Base models: load a HF causal LM + tokenizer; build lorakit's tiny demo model; convert GGUF files and
named real models into the cache."""

from .demo import DEMO, DEMO_MOE, build_demo_model, build_demo_tokenizer, demo_model_dir, ensure_demo_model, write_demo_model
from .gguf import GgufError, ensure_gguf_model
from .loading import DTYPES, ModelError, load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model
from .named import NAMED_MODELS, SMOLLM2, ensure_named_model

__all__ = [
    "DEMO", "DEMO_MOE", "build_demo_model", "build_demo_tokenizer", "demo_model_dir", "ensure_demo_model", "write_demo_model",
    "DTYPES", "ModelError", "load_model", "load_tokenizer", "resolve_device", "resolve_dtype", "resolve_model",
    "GgufError", "ensure_gguf_model", "NAMED_MODELS", "SMOLLM2", "ensure_named_model",
]
