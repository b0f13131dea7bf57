"""Causal-LM loss that never builds the full logits: the head runs only on labelled positions, in chunks.

The summed (not averaged) token loss is returned with the number of labelled tokens, so a caller
normalises once over a whole accumulation window (or all ranks): every labelled token weighs the
same, however the tokens fall into micro-batches.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenize import IGNORE
from ..distributed.vocab import chunked_logprobs, sharded_logprobs, vocab_shard
from ..models.attention import isolation_tolerance
from ..models.head import is_fsdp_unit, plain_head

def _sharded_head(model: nn.Module) -> Optional[Any]:
    """The head's ``vocab.VocabShard`` when FSDP2 holds it sharded by vocabulary rows (its own
    unit; ``distributed.embedding_units``), else None: the head's weight is whole right here."""
    head = model.get_output_embeddings()
    if not is_fsdp_unit(head):
        return None
    return vocab_shard(head.weight)


@torch.no_grad()
def packed_attention_is_isolated(model: nn.Module, vocab_limit: int = 64, tolerance: Optional[float] = None) -> bool:
    """Check on this very model that samples packed in one row (position_ids restarting at 0) see
    only themselves: the packed logits must equal those of each sample run alone, within
    ``tolerance`` (default: what the dtype of the model's weights allows, ``isolation_tolerance``)."""
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        a = torch.randint(1, vocab_limit, (1, 5), generator=gen).to(device)
        b = torch.randint(1, vocab_limit, (1, 4), generator=gen).to(device)
        positions = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False).logits[0, 5:].float()
        alone = model(input_ids=b, use_cache=False).logits[0].float()
        if tolerance is None:
            tolerance = isolation_tolerance(next(model.parameters()).dtype)
        return bool(torch.allclose(packed, alone, atol=tolerance, rtol=tolerance))
    finally:
        model.train(was_training)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions of ``batch``, and their count.

    Args:
        model: a HF causal LM (``get_decoder()`` + ``get_output_embeddings()``), LoRA or not.
        batch: ``input_ids`` (B, T), ``labels`` (B, T) with IGNORE where no loss is taken, and
            ``attention_mask`` or ``position_ids`` (B, T).

    Returns:
        ``(loss_sum, n)``: a scalar fp32 tensor and the number of labelled tokens.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not plain_head(model):
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), n
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
    selected = hidden[keep]  # (n, H): the head never runs on unlabelled positions
    shard = _sharded_head(model)
    if shard is not None:  # every rank takes part, whatever its n: the ranks exchange rows
        return -sharded_logprobs(selected, targets[keep], shard).sum(), n
    if n == 0:
        return selected.sum() * 0.0, 0
    return -chunked_logprobs(selected, model.get_output_embeddings().weight, targets[keep]).sum(), n


def causal_lm_loss_by_group(model: nn.Module, batch: dict[str, torch.Tensor], groups: torch.Tensor,
                            num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``causal_lm_loss`` summed per group of rows (the decoder runs once for the whole batch).

    Each group's sum is computed exactly as ``causal_lm_loss`` computes it for that group's rows
    alone, so a caller can weight each group by its own token count (several jobs in one batch).

    Args:
        model: a HF causal LM, LoRA or not.
        batch: as for ``causal_lm_loss``: ``input_ids``, ``labels`` (B, T) and ``attention_mask``
            or ``position_ids`` (B, T).
        groups: (B,) long, the group of each row, in ``[0, num_groups)``; or (B, T), the group of
            each token (a target is counted in its token's group).
        num_groups: how many groups there are (a group may have no row or no labelled token).

    Returns:
        ``(loss_sums, counts)``: (num_groups,) fp32 summed losses and (num_groups,) long labelled tokens.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    groups = groups.to(targets.device)
    row_group = groups[:, 1:] if groups.dim() == 2 else groups[:, None].expand_as(targets)
    counts = torch.zeros(num_groups, dtype=torch.long, device=targets.device).index_add_(
        0, row_group[keep], torch.ones_like(targets[keep]))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not plain_head(model):
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        per_token = F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
        zeros = torch.zeros(num_groups, dtype=torch.float32, device=per_token.device)
        return zeros.index_add(0, row_group[keep], per_token), counts
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
    shard = _sharded_head(model)
    if shard is not None:  # one exchange for all groups: every rank makes the same calls
        per_token = -sharded_logprobs(hidden[keep], targets[keep], shard)
        zeros = torch.zeros(num_groups, dtype=torch.float32, device=per_token.device)
        return zeros.index_add(0, row_group[keep], per_token), counts
    weight = model.get_output_embeddings().weight
    blocks = _group_blocks(row_group) if row_group.shape[0] == 1 else None
    if blocks is not None:
        # One row whose groups each hold a block of consecutive tokens (how ``jobs:`` packs a
        # micro-batch): split it into views, so no group's selection gathers from, or its gradient
        # scatters into, the whole row.
        sums = [None] * num_groups
        sizes = [stop - start for _, start, stop in blocks]
        for (group, _, _), h, t, k in zip(blocks, hidden.split(sizes, 1), targets.split(sizes, 1), keep.split(sizes, 1)):
            selected = h[k]
            sums[group] = (selected.sum().float() * 0.0 if selected.shape[0] == 0
                           else -chunked_logprobs(selected, weight, t[k]).sum())
        zero = hidden[:, :0].sum().float() * 0.0  # a group with no token: still in the graph, as below
        return torch.stack([zero if s is None else s for s in sums]), counts
    sums = []
    for group in range(num_groups):
        chosen = keep & (row_group == group)
        selected = hidden[chosen]  # (n_group, H)
        if selected.shape[0] == 0:  # still in the graph: every adapter used gets a (zero) gradient
            sums.append(selected.sum().float() * 0.0)
        else:
            sums.append(-chunked_logprobs(selected, weight, targets[chosen]).sum())
    return torch.stack(sums), counts


def _group_blocks(row_group: torch.Tensor) -> Optional[list[tuple[int, int, int]]]:
    """``(group, start, stop)`` per block of consecutive tokens of one group in a (1, T) row, when each
    group holds one block (None otherwise). Reads the T group ids back to the host once."""
    blocks: list[tuple[int, int, int]] = []
    for i, g in enumerate(row_group[0].tolist()):
        if blocks and blocks[-1][0] == g:
            blocks[-1] = (g, blocks[-1][1], i + 1)
        else:
            blocks.append((g, i, i + 1))
    return blocks if len({g for g, _, _ in blocks}) == len(blocks) else None


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of chosen next tokens, computed only where ``batch["labels"]`` asks.

    Args:
        model: a HF causal LM, LoRA or not.
        batch: ``input_ids`` (B, T), ``labels`` (B, T) holding the token whose log-prob is wanted
            at position t (the token at t, predicted from position t - 1) and IGNORE elsewhere,
            and ``attention_mask`` or ``position_ids`` (B, T).
        temperature: logits are divided by it first (the sampler's distribution).

    Returns:
        (n,) fp32 log-probs, in row-major order of the labelled positions (``labels[:, 1:] != IGNORE``).
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not plain_head(model):
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep].float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(1, targets[keep][:, None]).squeeze(1)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]
    shard = _sharded_head(model)
    if shard is not None:
        return sharded_logprobs(hidden, targets[keep], shard, temperature)
    return chunked_logprobs(hidden, model.get_output_embeddings().weight, targets[keep], temperature)
