"""A KV cache whose rows join and leave between decode steps (step-level batching).

Every row's history is right-aligned to one common end column, so one decode step appends one
column for all rows; shorter histories are padded on the left and masked out by a 2-D attention
mask, and every row carries its own position ids. A row joins with the cache its own prefill
built (one request, no padding) and leaves by being dropped from the batch dimension; columns
that no remaining row uses are trimmed away. It holds transformers' ``DynamicCache`` so the
model's own attention (eager, SDPA, GQA) reads it unchanged.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


def new_cache() -> Any:
    """An empty transformers ``DynamicCache`` (layers are created on the first forward)."""
    from transformers import DynamicCache

    return DynamicCache()


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") or not hasattr(layer, "values") for layer in layers):
        raise TypeError(f"{type(cache).__name__} does not keep one keys/values tensor per layer; the row cache "
                        "needs transformers' DynamicCache (transformers >= 5)")
    return layers


class RowCache:
    """The running batch's KV cache: ``rows`` rows of ``width`` columns, all ending at the last column.

    Attributes:
        cache: the transformers cache the model reads and appends to; per layer keys and values of
            shape (rows, kv_heads, width, head_dim).
        mask: (rows, width) long, 1 where a column holds one of that row's tokens.
        positions: (rows,) long, the position id of each row's next token.
    """

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, cache: Any, mask: torch.Tensor) -> None:
        """Append the rows of ``cache``, built by their own prefill; ``mask`` (new rows, its width)
        marks their tokens (left padding 0), so each row's next position is its mask's sum."""
        positions = mask.sum(dim=1)
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        length = mask.shape[1]
        width = max(self.width, length)
        mine, theirs = _layers(self.cache), _layers(cache)
        if len(mine) != len(theirs):
            raise RuntimeError(f"cache layer counts differ ({len(mine)} vs {len(theirs)})")
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([_pad_left(a.keys, width), _pad_left(b.keys, width)], dim=0)
            a.values = torch.cat([_pad_left(a.values, width), _pad_left(b.values, width)], dim=0)
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), F.pad(mask, (width - length, 0))], dim=0)
        self.positions = torch.cat([self.positions, positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current batch, in the new order); trim unused columns."""
        if not rows:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]  # left padding nobody needs any more
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask (rows, width + 1) and position ids (rows, 1) of the next decode step."""
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return mask, self.positions[:, None]

    def advance(self, mask: torch.Tensor) -> None:
        """Record that a decode step appended one column (``mask`` is what ``step_inputs`` gave)."""
        self.mask = mask
        self.positions = self.positions + 1


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, heads, length, dim) -> (rows, heads, width, dim) with zeros on the left."""
    return F.pad(x, (0, 0, width - x.shape[2], 0)) if x.shape[2] < width else x
