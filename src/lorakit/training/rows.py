"""SFT data as training rows, and the order rows are visited in: shared by the SFT recipes."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..config import DataSection, TrainSection
from ..data import Row, encode_all, read_jsonl, to_rows


def load_rows(path: str, data: DataSection, train: TrainSection, tokenizer: Any, what: str,
              log: Callable[[str], None], eos_token_ids: Sequence[int] = (),
              vocab_size: Optional[int] = None) -> list[Row]:
    """Read, check, tokenize and (if ``train.packing``) pack one JSONL file into training rows.

    ``eos_token_ids``: the model's end-of-sequence ids (``collect_eos_ids``); instruct models may list several.
    ``vocab_size``: the model's embedding rows (``vocab_rows``): a token id past them is an error.

    Raises:
        ValueError: naming the file and line of a malformed record (or of a token id the model has
            no embedding row for), or the file when no sample
            keeps a labelled token within ``train.max_seq_len``.
    """
    samples, skipped = read_jsonl(path, data.format, data.skip_invalid, data.system_prompt)
    encoded, dropped = encode_all(tokenizer, samples, train.max_seq_len, eos_token_ids, vocab_size)
    if not encoded:
        raise ValueError(f"{path}: no sample has a labelled token left within train.max_seq_len={train.max_seq_len}")
    rows = to_rows(encoded, train.max_seq_len, train.packing)
    tokens = sum(len(e.input_ids) for e in encoded)
    labels = sum(e.num_labels for e in encoded)
    log(f"{what} data: {path}: {len(encoded)} samples ({skipped} invalid lines skipped, {dropped} with no "
        f"label left after truncation), {tokens:,} tokens, {labels:,} labelled, {len(rows)} rows"
        + (" (packed)" if train.packing else ""))
    return rows


def vocab_rows(model: Any) -> Optional[int]:
    """The number of token ids ``model`` has an input embedding row for (None when it cannot tell)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return int(rows) if rows else None


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The rows' order in ``epoch``: a function of (seed, epoch) alone, so a resumed run (on any
    world size, or next to other jobs) sees the same batches."""
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
