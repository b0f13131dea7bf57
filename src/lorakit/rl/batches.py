"""Training batches of prompt + sampled completion, labelled on the completion only.

A step's B sequences are ``prompts[i] + completions[i].token_ids``. Per-token tensors (old and
reference log-probs, advantages, weights) are kept flat, one value per completion token in sequence
order, which is the order ``token_logprobs`` returns them in; a micro-batch gets its slice of each.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from ..data import IGNORE, Row, collate
from ..distributed import DistInfo
from .rollout import RolloutCompletion


def completion_rows(prompts: Sequence[list[int]], completions: Sequence[RolloutCompletion],
                    indices: Sequence[int]) -> list[Row]:
    """Rows for sequences ``indices``: prompt then completion tokens, labels on the completion alone."""
    rows = []
    for i in indices:
        p, c = prompts[i], completions[i].token_ids
        rows.append(Row(p + c, [IGNORE] * len(p) + c, list(range(len(p) + len(c)))))
    return rows


class CompletionBatches:
    """A step's sequences, cut into micro-batches of at most ``batch_size`` sequences.

    Args:
        prompts: B prompts' token ids (a prompt repeats for each of its completions).
        completions: the B completions, ``completions[i]`` sampled from ``prompts[i]``.
        batch_size: sequences per micro-batch.
        pad_id: the padding token (padded batches).
        padding_free: concatenate a micro-batch's sequences into one row with restarting
            ``position_ids`` instead of padding them (needs a model whose attention isolates them).
        device: where the batches go.
    """

    def __init__(self, prompts: Sequence[list[int]], completions: Sequence[RolloutCompletion], batch_size: int,
                 pad_id: int, padding_free: bool, device: torch.device = torch.device("cpu")) -> None:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        self.prompts, self.completions = prompts, completions
        self.batch_size, self.pad_id, self.padding_free, self.device = batch_size, pad_id, padding_free, device
        self.lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        """(B,) completion tokens per sequence."""
        self.offsets = [0]
        for c in completions:
            self.offsets.append(self.offsets[-1] + len(c.token_ids))

    def __len__(self) -> int:
        return len(self.completions)

    def micro_batches(self, indices: Optional[Sequence[int]] = None,
                      per_token: Optional[dict[str, torch.Tensor]] = None) -> Iterator[dict[str, torch.Tensor]]:
        """Collated micro-batches of sequences ``indices`` (default: all, in order).

        Args:
            indices: which sequences, in the order the batches take them.
            per_token: flat tensors over all B completions' tokens (sum of lengths); each batch gets
                the values of its own sequences' tokens under the same key.
        Yields:
            ``collate``'s batch (``input_ids``, ``labels``, a mask or ``position_ids``), plus ``per_token``'s keys.
        """
        indices = list(range(len(self))) if indices is None else list(indices)
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start:start + self.batch_size]
            rows = completion_rows(self.prompts, self.completions, chunk)
            batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id, False, self.padding_free).items()}
            for key, values in (per_token or {}).items():
                batch[key] = torch.cat([values[self.offsets[i]:self.offsets[i + 1]] for i in chunk]).to(self.device)
            yield batch


def logprob_gap(trainer: torch.Tensor, indices: Sequence[int], completions: Sequence[RolloutCompletion]) -> float:
    """Sum over tokens of |trainer log-prob - sampler log-prob|, for the completions that report them.

    Args:
        trainer: flat log-probs of sequences ``indices``' completion tokens, in that order.
        indices: the sequences ``trainer`` covers.
        completions: all the step's completions (``logprobs`` None: skipped).
    """
    gap, offset = 0.0, 0
    for i in indices:
        n = len(completions[i].token_ids)
        if completions[i].logprobs is not None:
            gap += float((trainer[offset:offset + n] - torch.tensor(completions[i].logprobs)).abs().sum())
        offset += n
    return gap


def sequences_to_train(chunk: Sequence[int], teaches: torch.Tensor, batch_size: int, info: DistInfo,
                       device: torch.device) -> list[int]:
    """The sequences of ``chunk`` that get a forward and backward: those that ``teaches``.

    A sequence with zero advantage and no per-token term (no KL) contributes exactly zero to the
    gradient, so its forward and backward are wasted work; they stay in the loss normaliser, which
    keeps the update that of the whole mini-batch. Under DDP/FSDP2 every rank must run as many
    micro-batches as the others (each backward is a collective), so a rank tops its list up with
    skipped sequences to the largest micro-batch count of any rank.

    Args:
        chunk: the mini-batch's sequence indices, in order.
        teaches: (B,) bool over all the step's sequences.
        batch_size: sequences per micro-batch.
    Returns:
        indices in ``chunk`` order: every teaching one, then fillers where a rank needs them.
    """
    kept = [i for i in chunk if bool(teaches[i])]
    if info.mode == "none":
        return kept
    count = torch.tensor([math.ceil(len(kept) / batch_size)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    fillers = [i for i in chunk if not bool(teaches[i])]
    want = min(int(count.item()) * batch_size, len(chunk))
    chosen = set(kept + fillers[:max(want - len(kept), 0)])
    return [i for i in chunk if i in chosen]
