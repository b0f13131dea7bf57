"""A KV cache whose rows join and leave between decode steps, written in place (step-level batching).

Each running row owns one slot of a preallocated buffer per layer, keys and values of shape
(slots, kv_heads, capacity, head_dim); its tokens sit left-aligned in its slot, so column ``j``
holds position ``j``. A decode step writes one column per row (at that row's own length) and the
model's attention reads a view of the first ``rows`` slots and ``width + 1`` columns, where a 2-D
mask hides each row's columns past its own length. So the bytes written per decode step grow with
the rows, never with the history:

- a step writes ``rows x kv_heads x head_dim`` keys and values per layer, in place;
- a row joins by copying its own prefill (its prompt's keys and values) into a free slot;
- a row leaves by moving the last slot's row into its slot (one row copied, none if it was last);
- capacity (columns) and slots grow geometrically when a row needs more (amortised O(1) per token),
  or once at join when the engine reserves a row's whole length (``add(reserve=...)``).

The model reads the cache through ``SlotCache``, a transformers ``Cache`` whose ``update`` does the
in-place write, so the model's own attention (eager, SDPA, GQA) and mask code run unchanged. Only
full-attention layers are supported: a sliding-window mask is built from one query position for the
whole batch, which is wrong for rows shorter than the longest (``check_full_attention``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional

import torch


def new_cache() -> Any:
    """An empty transformers ``DynamicCache`` for a prefill (layers are created on the first forward)."""
    from transformers import DynamicCache

    return DynamicCache()


def check_full_attention(config: Any) -> None:
    """Refuse a model with sliding-window (or other non-full) attention layers, naming them.

    Raises:
        ValueError: ``config`` declares layer types other than ``full_attention``, or a sliding window in use.
    """
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    name = getattr(text, "model_type", type(text).__name__)
    if types is not None:
        other = sorted({t for t in types if t != "full_attention"})
        if other:
            raise ValueError(f"the generation engine supports full-attention layers only; this {name} model has "
                             f"{', '.join(other)} layers (config.layer_types)")
    elif getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        raise ValueError(f"the generation engine supports full-attention layers only; this {name} model uses a "
                         f"sliding window of {text.sliding_window} (config.sliding_window)")


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") or not hasattr(layer, "values") for layer in layers):
        raise TypeError(f"{type(cache).__name__} does not keep one keys/values tensor per layer; the row cache "
                        "joins rows from transformers' DynamicCache (transformers >= 5)")
    return layers


class RowCache:
    """The running batch's KV cache: ``rows`` rows in slots ``0 .. rows-1``, each of its own length.

    Attributes:
        keys, values: per layer, (slots, kv_heads, capacity, head_dim) buffers; row ``i`` lives in
            slot ``i``, its tokens in columns ``0 .. lengths[i]-1``.
        lengths: (rows,) host ints, tokens cached per row (= the position id of its next token).
        cache: the ``SlotCache`` the model is given at a decode step.
    """

    def __init__(self, max_rows: Optional[int] = None) -> None:
        self.max_rows = max_rows  # slots never grow past this (the engine's max_num_seqs)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self._lens: Optional[torch.Tensor] = None  # (rows,) long on the device: ``lengths``
        self._width = 0  # max(lengths), the width the next step's view extends by one column
        self._columns: Optional[torch.Tensor] = None  # arange(capacity) for the mask
        self._slot_index: Optional[torch.Tensor] = None  # arange(slots) for the per-row writes
        self._subset: Optional[torch.Tensor] = None  # the slots a retried step runs on (``only``)
        self.cache = _slot_cache_type()(self)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Columns a decode step attends to before its own token: the longest row's length."""
        return self._width

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def add(self, cache: Any, lengths: list[int], reserve: int = 0, source: Optional[list[int]] = None) -> None:
        """Copy the rows of ``cache`` (built by their own prefill) into free slots.

        Args:
            cache: a transformers cache whose per-layer keys/values are (cache rows, kv_heads, width,
                head_dim), each row's tokens in its last columns (left padding).
            lengths: prompt tokens of each new row.
            reserve: columns to make room for now (a row's prompt + the tokens it may still
                generate), so its decode steps never grow the buffers; 0 grows them as needed.
            source: the cache row each new row copies (rows that shared one prefill); None: new
                row j is cache row j.
        """
        theirs = _layers(cache)
        if self.keys and len(self.keys) != len(theirs):
            raise RuntimeError(f"cache layer counts differ ({len(self.keys)} vs {len(theirs)})")
        rows, new = self.rows, len(lengths)
        self._ensure(rows + new, max(max(lengths) + 1, reserve), theirs)
        width = theirs[0].keys.shape[2]
        same = all(n == lengths[0] for n in lengths)
        index = None if source is None else torch.tensor(source, device=theirs[0].keys.device)
        pick = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
        for mine_k, mine_v, layer in zip(self.keys, self.values, theirs):
            if same:  # one copy per layer: the common case of a group of equal prompts, or one row
                n = lengths[0]
                mine_k[rows:rows + new, :, :n] = pick(layer.keys[:, :, width - n:])
                mine_v[rows:rows + new, :, :n] = pick(layer.values[:, :, width - n:])
                continue
            for j, n in enumerate(lengths):
                k = j if source is None else source[j]
                mine_k[rows + j, :, :n] = layer.keys[k, :, width - n:]
                mine_v[rows + j, :, :n] = layer.values[k, :, width - n:]
        device = self.keys[0].device
        added = torch.tensor(lengths, dtype=torch.long, device=device)
        self._lens = added if self._lens is None else torch.cat([self._lens, added])
        self.lengths.extend(lengths)
        self._width = max(self._width, max(lengths))

    def remove(self, gone: list[int]) -> list[int]:
        """Drop rows ``gone`` (indices into the current rows); the last rows move into the freed slots.

        Returns:
            The new row order: ``order[i]`` is the old index of the row now in slot ``i``.
        """
        order = list(range(self.rows))
        for g in sorted(set(gone), reverse=True):
            order[g] = order[-1]
            order.pop()
        if not order:
            self.clear()
            return []
        # A kept row moves only from beyond the new end into a freed slot below it, so sources and
        # destinations are disjoint and one gather/scatter per buffer moves them all.
        moves = [(old, new) for new, old in enumerate(order) if old != new]
        if moves:
            device = self.keys[0].device
            src = torch.tensor([m[0] for m in moves], device=device)
            dst = torch.tensor([m[1] for m in moves], device=device)
            n = max(self.lengths[m[0]] for m in moves)
            for buf in (*self.keys, *self.values):
                buf[dst, :, :n] = buf[src, :, :n]
        self.lengths = [self.lengths[o] for o in order]
        self._lens = torch.tensor(self.lengths, dtype=torch.long, device=self.keys[0].device)
        self._width = max(self.lengths)
        return order

    def clear(self) -> None:
        """Drop every row and free the buffers."""
        self.keys, self.values, self.lengths = [], [], []
        self._lens = self._columns = self._slot_index = None
        self._width = 0

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask (rows, width + 1) bool and position ids (rows, 1) of the next decode step
        (of the ``only`` rows inside that block)."""
        self._ensure(self.rows, self._width + 1)
        lens = self._lens if self._subset is None else self._lens[self._subset]
        mask = self._columns[:self._width + 1] <= lens[:, None]
        return mask, lens[:, None]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's keys and values (rows, kv_heads, 1, head_dim) of ``layer``, written at each
        row's own length; returns the views (rows, kv_heads, width + 1, head_dim) attention reads
        (inside ``only``: those rows', gathered)."""
        subset = self._subset
        rows = self.rows if subset is None else len(subset)
        if keys.shape[0] != rows or keys.shape[2] != 1:
            raise RuntimeError(f"the row cache takes one token for each of its {rows} rows per forward, got "
                               f"keys of shape {tuple(keys.shape)}")
        k, v = self.keys[layer], self.values[layer]
        index = self._slot_index[:rows] if subset is None else subset
        lens = self._lens if subset is None else self._lens[subset]
        k[index, :, lens] = keys[:, :, 0]
        v[index, :, lens] = values[:, :, 0]
        if subset is None:
            return k[:rows, :, :self._width + 1], v[:rows, :, :self._width + 1]
        return k[subset, :, :self._width + 1], v[subset, :, :self._width + 1]

    @contextlib.contextmanager
    def only(self, slots: list[int]) -> Iterator[None]:
        """Inside the block, a decode step runs on rows ``slots`` only (retrying part of a failed
        step): ``step_inputs`` and the model's writes cover those rows, the others are untouched."""
        self._ensure(self.rows, self._width + 1)
        self._subset = torch.tensor(slots, dtype=torch.long, device=self.keys[0].device)
        try:
            yield
        finally:
            self._subset = None

    def discard(self, slots: list[int]) -> None:
        """Zero what a failed decode step may have written for rows ``slots`` (the column at each
        row's length, in every layer): it is masked until rewritten, but a NaN in a masked column
        still turns attention's output NaN (0 x NaN), so it must not stay."""
        if not self.keys or not slots:
            return
        index = torch.tensor(slots, dtype=torch.long, device=self.keys[0].device)
        lens = self._lens[index]
        for buf in (*self.keys, *self.values):
            buf[index, :, lens] = 0

    def advance(self) -> None:
        """Record that a decode step appended one token to every row."""
        self._lens += 1
        self.lengths = [n + 1 for n in self.lengths]
        self._width += 1

    def _ensure(self, slots: int, columns: int, like: Optional[list[Any]] = None) -> None:
        """Grow the buffers (geometrically) to hold ``slots`` rows of ``columns`` tokens; the rows in
        use are copied once into the new buffers. New memory is zeroed: attention multiplies a masked
        column's value by a weight of exactly 0, which is NaN if uninitialised memory held NaN or inf."""
        if not self.keys:
            if like is None:
                raise RuntimeError("the row cache is empty")
            shapes = [(layer.keys, layer.values) for layer in like]
            self.keys = [torch.zeros((slots, k.shape[1], _room(columns), k.shape[3]), dtype=k.dtype, device=k.device)
                         for k, _ in shapes]
            self.values = [torch.zeros((slots, v.shape[1], _room(columns), v.shape[3]), dtype=v.dtype, device=v.device)
                           for _, v in shapes]
        elif slots > self.slots or columns > self.capacity:
            doubled = min(2 * self.slots, self.max_rows or 2 * self.slots)
            n_slots = max(slots, doubled) if slots > self.slots else self.slots
            n_cols = max(columns, 2 * self.capacity) if columns > self.capacity else self.capacity
            rows, used = self.rows, self._width
            for bufs in (self.keys, self.values):
                for i, old in enumerate(bufs):
                    grown = old.new_zeros((n_slots, old.shape[1], n_cols, old.shape[3]))
                    grown[:rows, :, :used] = old[:rows, :, :used]
                    bufs[i] = grown
        else:
            return
        device = self.keys[0].device
        self._columns = torch.arange(self.capacity, device=device)
        self._slot_index = torch.arange(self.slots, device=device)


def _room(columns: int) -> int:
    """First capacity for ``columns``: the next power of two (at least 16)."""
    return max(16, 1 << (columns - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _slot_cache_type() -> type:
    """``SlotCache``: the transformers ``Cache`` the model reads and writes a ``RowCache`` through
    (defined on first use, as transformers is an optional dependency of lorakit)."""
    from transformers.cache_utils import Cache

    class SlotCache(Cache):
        """A decode step's view of a ``RowCache`` for the model's forward (query offset = the width;
        the 2-D attention mask, one column longer than the width, masks each row's padding)."""

        def __init__(self, rows: RowCache) -> None:
            super().__init__(layers=[])
            self.rows = rows

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return self.rows.write(layer_idx, key_states, value_states)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.rows.width

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return self.rows.width

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
            return self.rows.width + query_length, 0

        def get_max_length(self, layer_idx: Optional[int] = None) -> int:
            return -1

        def __len__(self) -> int:
            return len(self.rows.keys)

    return SlotCache
