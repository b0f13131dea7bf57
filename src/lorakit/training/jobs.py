"""Pieces for training several adapters at once on one base: mixed micro-batches, each job's place
in its data, and which parameters belong to which adapter."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..data import IGNORE, Row
from ..data.tokenize import pad_rows
from ..lora import lora_modules
from .rows import epoch_order


def mixed_batch(groups: Sequence[Sequence[Row]], pad_id: int, packed: bool, concat: bool,
                fill_empty: bool, one_row: bool = False) -> dict[str, torch.Tensor]:
    """One micro-batch holding the rows of several jobs, and the job of each batch row.

    Args:
        groups: per job, its rows in this micro-batch (possibly none).
        pad_id: the padding token.
        packed: give ``position_ids`` (padding forms a block of its own that nothing reads; the
            model must keep packed samples apart) instead of an ``attention_mask``.
        concat: put each job's rows end to end into one batch row (padding-free within a job;
            needs ``packed``).
        fill_empty: give a job with no rows one unlabelled token, so that its adapter still takes
            part in the step (distributed runs: every rank's collectives must cover the same parameters).
        one_row: put every job's rows end to end into a single batch row (no padding at all; needs
            ``concat``); each token's job is then given, for per-token adapter routing.

    Returns:
        ``input_ids``, ``labels`` (B, T), ``position_ids`` or ``attention_mask`` (B, T),
        ``row_group``: the index into ``groups`` of each batch row (B,), or with ``one_row`` of
        each token (1, T); and ``num_tokens`` (real tokens, filler excluded).
    """
    if one_row:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        owner: list[int] = []
        real = 0
        for index, group in enumerate(groups):
            if not group and not fill_empty:
                continue
            real += sum(len(r.input_ids) for r in group)
            group = group or [Row([pad_id], [IGNORE], [0])]
            start = len(labels)
            for r in group:
                ids += r.input_ids
                labels += r.labels
                positions += r.position_ids
            # A job's first token is never its target: the token before it belongs to another job.
            labels[start] = IGNORE
            owner += [index] * (len(labels) - start)
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "row_group": torch.tensor([owner]),
                "num_tokens": torch.tensor(real)}
    rows: list[Row] = []
    owner: list[int] = []
    real = 0
    for index, group in enumerate(groups):
        if not group:
            if fill_empty:
                rows.append(Row([pad_id], [IGNORE], [0]))
                owner.append(index)
            continue
        real += sum(len(r.input_ids) for r in group)
        if concat:
            group = [Row([t for r in group for t in r.input_ids], [t for r in group for t in r.labels],
                         [t for r in group for t in r.position_ids])]
        rows += group
        owner += [index] * len(group)
    ids, labels, positions, mask = pad_rows(rows, pad_id)
    batch = {"input_ids": ids, "labels": labels, "row_group": torch.tensor(owner, dtype=torch.long),
             "num_tokens": torch.tensor(real)}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch


def labelled_tokens(rows: Sequence[Row], concat: bool) -> int:
    """Labelled next-token targets that ``mixed_batch`` gives one job's ``rows`` (the loss counts
    ``labels[:, 1:]``: a batch row's first label is never a target)."""
    if concat and rows:
        flat = [t for r in rows for t in r.labels]
        return sum(1 for t in flat[1:] if t != IGNORE)
    return sum(1 for r in rows for t in r.labels[1:] if t != IGNORE)


def next_window(rows: Sequence[Row], state: dict[str, Any], seed: int, global_batch: int,
                grad_accum: int) -> list[list[Row]]:
    """The global micro-batches of a job's next optimizer step, from its position ``state``
    (``epoch``, ``sample``): the same ones the single-run SFT recipe would take."""
    order = epoch_order(len(rows), seed, state["epoch"])
    window = []
    for k in range(grad_accum):
        start = state["sample"] + k * global_batch
        if start < len(order):
            window.append([rows[j] for j in order[start:start + global_batch]])
    return window


def advance(state: dict[str, Any], num_rows: int, global_batch: int, grad_accum: int) -> None:
    """Move a job's position past the window it just stepped on (into the next epoch at the end)."""
    state["sample"] = min(num_rows, state["sample"] + grad_accum * global_batch)
    state["step"] += 1
    if state["sample"] >= num_rows:
        state["epoch"] += 1
        state["sample"] = 0


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every parameter of adapter ``name`` (LoRA A/B, trained copies), in model order."""
    return [p for _, module in lora_modules(model) for p in module.adapter_parameters(name)]


def train_only(model: nn.Module, names: Sequence[str]) -> None:
    """Freeze every parameter, then unfreeze those of the adapters ``names`` (all trained together)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        for p in adapter_parameters(model, name):
            p.requires_grad_(True)
