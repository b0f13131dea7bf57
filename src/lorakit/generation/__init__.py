"""Text generation with (LoRA) causal LMs: a batched engine with per-row adapters, and helpers."""

from .engine import Completion, Delta, Engine, EngineBroken, Request, RequestFailed, SamplingParams
from .simple import complete, format_prompt

__all__ = ["Completion", "Delta", "Engine", "EngineBroken", "Request", "RequestFailed", "SamplingParams", "complete", "format_prompt"]
