"""Single-prompt completion on lorakit's engine, used by `lorakit generate` and `lorakit chat`."""

from __future__ import annotations

from typing import Any, Optional, Union

from ..data.tokenize import render_chat


def format_prompt(tokenizer: Any, prompt: Union[str, list[dict[str, str]]], chat: Optional[bool] = None) -> tuple[str, bool]:
    """Render ``prompt``: with the chat template and a generation prompt unless ``chat`` is False (the
    template is the tokenizer's, or ChatML as in training). Returns (text, rendered_as_chat)."""
    if chat is None:
        chat = True
    if not chat:
        return (prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)), False
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_chat(tokenizer, messages, add_generation_prompt=True), True


def complete(
    model: Any,
    tokenizer: Any,
    prompt: Union[str, list[dict[str, str]]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    chat: Optional[bool] = None,
    adapter: Optional[str] = None,
) -> str:
    """Generate a completion and return only the new text (greedy when temperature is 0).

    ``adapter`` None uses the model's active adapter (the base if none is active).
    """
    from ..lora import active_adapters
    from .engine import Engine, Request, SamplingParams

    if adapter is None:
        active = active_adapters(model)
        if len(active) > 1:
            raise ValueError(f"several adapters are active ({active}); name the one to generate with")
        adapter = active[0] if active else None

    text, as_chat = format_prompt(tokenizer, prompt, chat)
    # A rendered template already holds the special tokens the model expects.
    ids = tokenizer(text, add_special_tokens=not as_chat)["input_ids"]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return Engine(model, tokenizer).generate([Request(ids, adapter, params)])[0].text
