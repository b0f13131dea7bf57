"""PyTorch's sdpa, one packed sample at a time: padding-free rows without a dense (T, T) mask.

A padding-free row holds several samples end to end, ``position_ids`` restarting at each. With
plain ``sdpa`` transformers keeps them apart with a dense block-diagonal (T, T) mask, and the
attention costs (sum of the samples' lengths)^2 in time and memory. This kernel instead splits the
row at the restarts and runs causal sdpa on each sample: sum of length^2, what the samples cost in
batches of their own. A sliding-window layer masks each sample longer than its window with that
sample's own band mask. Anything else (a padding mask, a KV cache, decoding) goes to ``sdpa`` as is.

It is registered with transformers under ``PACKED_SDPA`` (``register_packed_sdpa``) and chosen by a
model with ``model.set_attn_implementation(PACKED_SDPA)``. The boundaries are read from the
position ids once per forward pass (one host sync), not once per layer.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

PACKED_SDPA = "lorakit_packed_sdpa"
"""The name this kernel is registered under in transformers' attention and mask interfaces."""

# The last position-ids tensor seen and its samples' lengths per row: every layer of one forward
# pass gets the same tensor object, so the host reads the boundaries once per pass.
_last: tuple[Optional[weakref.ref], list[list[int]]] = (None, [])


def sample_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row of ``position_ids`` (B, T), the lengths of its packed samples: a sample starts where
    the position does not follow the one before (transformers' own rule for packed rows)."""
    global _last
    ref, lengths = _last
    if ref is not None and ref() is position_ids:
        return lengths
    ids = position_ids.detach()
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1
    lengths = []
    for row in starts.cpu():
        edges = row.nonzero().flatten().tolist() + [row.shape[0]]
        lengths.append([b - a for a, b in zip(edges, edges[1:])])
    _last = (weakref.ref(position_ids), lengths)
    return lengths


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                        sliding_window: Optional[int] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature.

    Args:
        query: (B, heads, T, head_dim); key, value: (B, kv_heads, S, head_dim).
        attention_mask: None when the mask function (``packed_mask``) found nothing to mask but
            the causal pattern within each sample; otherwise sdpa's mask, passed through.
        kwargs: ``position_ids`` (B, T) from the decoder layer, among others.

    Returns:
        ``(output, None)``: output (B, T, heads, head_dim), as transformers' sdpa returns it.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    lengths = sample_lengths(position_ids.expand(query.shape[0], -1))
    rows = []
    for b, sizes in enumerate(lengths):
        parts = [_one_sample(module, q, k, v, dropout, scaling, sliding_window)
                 for q, k, v in zip(query[b:b + 1].split(sizes, 2), key[b:b + 1].split(sizes, 2),
                                    value[b:b + 1].split(sizes, 2))]
        rows.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
    return (torch.cat(rows, 0) if len(rows) > 1 else rows[0]), None


def _one_sample(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                scaling: Optional[float], sliding_window: Optional[int]) -> torch.Tensor:
    """sdpa over one sample (1, heads, L, head_dim): causal, within ``sliding_window`` when the sample is
    longer than the window (transformers' rule: query i sees keys j with i - window < j <= i)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    if sliding_window is None or length <= sliding_window:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
    i = torch.arange(length, device=query.device)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)  # (L, L): True = attend
    return sdpa_attention_forward(module, query, key, value, band[None, None], dropout=dropout, scaling=scaling,
                                  is_causal=False)[0]


def packed_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Optional[torch.Tensor]:
    """transformers' mask-interface signature: no mask for a whole sequence without padding (packed
    or not: the kernel keeps the samples apart), sdpa's mask for everything else."""
    from transformers.masking_utils import sdpa_mask

    no_padding = attention_mask is None or bool(attention_mask[:, -kv_length:].all())
    if no_padding and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def register_packed_sdpa() -> str:
    """Register the kernel and its mask function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, packed_mask)
    return PACKED_SDPA
