"""Text generation with a (LoRA) causal LM."""

from .simple import complete, format_prompt

__all__ = ["complete", "format_prompt"]
