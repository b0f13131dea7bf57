"""Single-prompt completion on transformers' `generate` (KV cache), used by `lorakit generate/chat`."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..data.tokenize import render_chat


def format_prompt(tokenizer: Any, prompt: Union[str, list[dict[str, str]]], chat: Optional[bool] = None) -> tuple[str, bool]:
    """Render ``prompt``: with the chat template and a generation prompt when ``chat`` (default: when
    the tokenizer has a template or ``prompt`` is a list of messages). Returns (text, rendered_as_chat)."""
    if chat is None:
        chat = isinstance(prompt, list) or bool(getattr(tokenizer, "chat_template", None))
    if not chat:
        return (prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)), False
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_chat(tokenizer, messages, add_generation_prompt=True), True


@torch.no_grad()
def complete(
    model: Any,
    tokenizer: Any,
    prompt: Union[str, list[dict[str, str]]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    chat: Optional[bool] = None,
) -> str:
    """Generate a completion and return only the new text (greedy when temperature is 0)."""
    text, as_chat = format_prompt(tokenizer, prompt, chat)
    device = next(model.parameters()).device
    # A rendered template already holds the special tokens the model expects.
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not as_chat)["input_ids"].to(device)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=sampling, temperature=temperature if sampling else None, top_p=top_p if sampling else None,
        top_k=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
