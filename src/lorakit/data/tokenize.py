"""Examples -> token ids with assistant-only labels; truncation, packing and collation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .records import DataError, Example

IGNORE = -100

# Used when a tokenizer has no chat template of its own (ChatML, as Qwen writes it).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Encoded:
    """One tokenized sample. ``labels[i]`` is the target at position i (IGNORE: no loss there)."""

    input_ids: list[int]
    labels: list[int]
    source: str

    @property
    def num_labels(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render with the tokenizer's chat template (ChatML when it has none: training and generation agree)."""
    template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=template)
    except Exception as err:  # jinja2's TemplateError and friends: the template refuses this conversation
        raise DataError(f"the chat template cannot render this conversation: {err}") from None


def collect_eos_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every token id that ends a sequence: the tokenizer's eos first, then the generation config's.

    Instruct models often list several (Qwen: ``[<|im_end|>, <|endoftext|>]``; Llama 3:
    ``[<|end_of_text|>, <|eom_id|>, <|eot_id|>]``) in ``generation_config.eos_token_id``, an int or a list.
    """
    listed = getattr(generation_config, "eos_token_id", None)
    listed = list(listed) if isinstance(listed, (list, tuple)) else [listed]
    ids = [tokenizer.eos_token_id, *listed]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], full: str,
                     eos_ids: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Character spans of ``full`` written by the assistant (its content and end-of-turn marker).

    A turn's span is what rendering ``messages[:i+1]`` adds over ``messages[:i]`` plus the
    generation prompt. Templates that rewrite earlier turns (e.g. strip reasoning) are not
    prefix-consistent; there the span is found by searching for the content instead.
    """
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            # Walk past this turn's text too, so a content search never lands in an earlier turn.
            found = full.find(message["content"], cursor) if message["content"] else -1
            if found >= 0:
                cursor = found + len(message["content"])
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1])
        if full.startswith(upto) and upto.startswith(prompt):
            spans.append((len(prompt), len(upto)))
            cursor = len(upto)
            continue
        start = full.find(message["content"], cursor)
        if start < 0:
            raise DataError("the chat template does not reproduce an assistant turn's content verbatim")
        end = start + len(message["content"])
        # The turn's end-of-turn marker is learnt too: any of the eos tokens right after the content.
        for eos in (tokenizer.decode([i]) for i in eos_ids):
            if eos and full.startswith(eos, end):
                end += len(eos)
                break
        spans.append((start, end))
        cursor = end
    return spans


def encode_example(tokenizer: Any, sample: Example, max_seq_len: int, eos_token_ids: Sequence[int] = ()) -> Encoded:
    """Tokenize an example; chat examples get labels on assistant tokens only. Truncates to max_seq_len.

    Args:
        eos_token_ids: end-of-sequence ids besides the tokenizer's own (``collect_eos_ids`` with the
            model's generation config): a text sample ends with the first of all of them, and an
            assistant turn's label span takes in whichever follows its content.
    """
    eos_ids = list(dict.fromkeys(collect_eos_ids(tokenizer) + [int(i) for i in eos_token_ids]))
    if sample.text is not None:
        ids = tokenizer(sample.text, add_special_tokens=True)["input_ids"]
        if eos_ids:
            ids = ids + [eos_ids[0]]
        labels = list(ids)
    else:
        full = render_chat(tokenizer, sample.messages)
        spans = _assistant_spans(tokenizer, sample.messages, full, eos_ids)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = []
        for token, (start, _) in zip(ids, enc["offset_mapping"]):
            inside = any(s <= start < e for s, e in spans)
            labels.append(token if inside else IGNORE)
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    # Position 0 is never predicted; masking it also keeps packed samples from predicting across.
    if labels:
        labels[0] = IGNORE
    return Encoded(ids, labels, sample.source)


def encode_all(tokenizer: Any, samples: Sequence[Example], max_seq_len: int,
               eos_token_ids: Sequence[int] = (), vocab_size: Optional[int] = None) -> tuple[list[Encoded], int]:
    """Encode samples (see ``encode_example``), dropping those left with no label after truncation;
    with ``vocab_size`` (the model's embedding rows), an id past it is an error naming the sample.
    Returns (encoded, dropped)."""
    out, dropped = [], 0
    for sample in samples:
        try:
            enc = encode_example(tokenizer, sample, max_seq_len, eos_token_ids)
            check_vocab(enc.input_ids, vocab_size)
        except DataError as err:
            raise DataError(f"{sample.source}: {err}") from None
        if enc.num_labels == 0:
            dropped += 1
            continue
        out.append(enc)
    return out, dropped


@dataclass
class Row:
    """A training row: one sample, or several packed ones (``position_ids`` restart per sample)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def to_rows(encoded: Sequence[Encoded], max_seq_len: int, packing: bool) -> list[Row]:
    """One row per sample, or (packing) samples concatenated greedily into rows of at most max_seq_len."""
    if not packing:
        return [Row(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in encoded]
    rows: list[Row] = []
    current = Row([], [], [])
    for e in encoded:
        if current.input_ids and len(current.input_ids) + len(e.input_ids) > max_seq_len:
            rows.append(current)
            current = Row([], [], [])
        current.input_ids += e.input_ids
        current.labels += e.labels
        current.position_ids += list(range(len(e.input_ids)))
    if current.input_ids:
        rows.append(current)
    return rows


def pad_rows(rows: Sequence[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` to their longest: ``(input_ids, labels, position_ids, attention_mask)``, each (rows, width).

    Padding gets label IGNORE, mask 0 and positions of its own (0, 1, ...), so in a packed batch it
    forms a separate block that nothing reads.
    """
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        positions[i, :n] = torch.tensor(row.position_ids)
        positions[i, n:] = torch.arange(width - n)
        mask[i, :n] = 1
    return ids, labels, positions, mask


def collate(rows: Sequence[Row], pad_id: int, packed: bool, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch, or (``padding_free``) concatenate them into one row with no padding.

    Unpacked batches carry an attention mask. Packed and padding-free batches carry ``position_ids``
    instead (and no mask), from which transformers builds a block-diagonal causal mask: no token
    attends across samples. That needs a forward pass without a KV cache (``use_cache=False``).
    Padding gets positions of its own, so it forms a separate block that nothing reads.
    """
    if padding_free and len(rows) > 1:
        rows = [Row([t for r in rows for t in r.input_ids], [t for r in rows for t in r.labels],
                    [t for r in rows for t in r.position_ids])]
        packed = True
    ids, labels, positions, mask = pad_rows(rows, pad_id)
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    batch["num_tokens"] = mask.sum()
    return batch


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


def check_vocab(ids: Sequence[int], vocab_size: Optional[int]) -> None:
    """Refuse token ids the model has no embedding row for, naming where they came from.

    A tokenizer with tokens the model lacks (added tokens, embeddings not resized) would otherwise
    fail inside the embedding lookup (an IndexError in one process) or, with a vocabulary-sharded
    embedding, silently read zeros.

    Raises:
        DataError: the largest id, when >= ``vocab_size`` (None: nothing to check); the caller
            names the sample.
    """
    if vocab_size is None or not ids:
        return
    top = max(ids)
    if top >= vocab_size:
        raise DataError(f"token id {top} is outside the model's vocabulary ({vocab_size} embedding rows): "
                        "the tokenizer has tokens the model lacks (added tokens? resize the model's embeddings, "
                        "or use the model's own tokenizer)")

