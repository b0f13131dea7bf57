"""The embedding lookup and the loss's log-probs on FSDP2's vocabulary shards, never gathered.

FSDP2 shards the (vocab, H) embedding and head by rows. Gathering one whole for a lookup of a few
thousand tokens, or for the loss's logits, puts a whole (vocab, H) matrix on every rank at the
step's peak (twice that on gloo, whose all-gather stages through its own buffer): on a 150k
vocabulary, more than a transformer block. Here the ranks of the shard group exchange what is
small instead (token ids, hidden rows: tokens x H), each rank works on its own vocabulary rows for
everyone's tokens, and the results go back to their owners with one reduce-scatter. Every rank
must call these as often as the others, which FSDP2's forward already requires.

The loss's chunked log-probs live here for a whole head too (``chunked_logprobs``): one autograd
function serves both, so the one-process and the sharded paths cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

# Rows of (tokens x vocab-shard) fp32 logits materialised at once.
CHUNK_ROWS = 512


@dataclass
class VocabShard:
    """This rank's rows of a row-sharded (vocab, H) weight and the group that holds the rest."""

    group: Any
    rank: int
    world: int
    start: int
    """The first vocabulary row held here."""
    local: torch.Tensor
    """(rows, H): this rank's rows."""
    param: Any = None
    """The sharded parameter itself (a DTensor), to gather whole when that is cheaper."""

    @property
    def vocab(self) -> int:
        """Rows of the whole weight."""
        return int(self.param.shape[0]) if self.param is not None else self.local.shape[0] * self.world


def vocab_shard(weight: torch.Tensor) -> Optional[VocabShard]:
    """The vocabulary shard of an FSDP2 parameter (a DTensor sharded by rows), None otherwise (a
    plain tensor, or one FSDP2 has gathered for the moment)."""
    placements = getattr(weight, "placements", None)
    if placements is None:
        return None
    dims = [i for i, p in enumerate(placements) if p.is_shard()]
    if len(dims) != 1 or placements[dims[0]].dim != 0:
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = weight.device_mesh
    group = mesh.get_group(dims[0])
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    return VocabShard(group, dist.get_rank(group), dist.get_world_size(group), offset[0], weight.to_local(), weight)


def _most_rows(count: int, shard: VocabShard, device: torch.device) -> int:
    """The largest row count of any rank of the shard group (a collective)."""
    mine = torch.tensor([count], device=device)
    counts = [torch.zeros_like(mine) for _ in range(shard.world)]
    dist.all_gather(counts, mine, group=shard.group)
    return int(max(c.item() for c in counts))


def _gather_rows(x: torch.Tensor, shard: VocabShard, most: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """Every rank's ``x`` (rows may differ in number), each padded to the longest:
    (world * most, ...), and ``most`` (pass it when known: it costs a collective)."""
    if most is None:
        most = _most_rows(x.shape[0], shard, x.device)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[:x.shape[0]] = x
    every = x.new_empty((shard.world * most, *x.shape[1:]))
    dist.all_gather_into_tensor(every, padded.contiguous(), group=shard.group)
    return every, most


def _return_rows(partial: torch.Tensor, most: int, count: int, shard: VocabShard) -> torch.Tensor:
    """Sum every rank's (world * most, ...) partial results and keep this rank's first ``count`` rows."""
    mine = partial.new_empty((most, *partial.shape[1:]))
    dist.reduce_scatter_tensor(mine, partial.contiguous(), group=shard.group)
    return mine[:count]


@torch.no_grad()
def sharded_lookup(ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """``embedding(ids)`` from the shard group's rows: each rank looks up everyone's ids it holds.

    Args:
        ids: (...) token ids of this rank.
        shard: the embedding's ``vocab_shard``.

    Returns:
        (..., H) embeddings, bit-identical to a whole-table lookup (one rank contributes each row,
        the others zeros).
    """
    flat = ids.reshape(-1)
    every, most = _gather_rows(flat, shard)
    local = every - shard.start
    inside = (local >= 0) & (local < shard.local.shape[0])
    table = shard.local.to(ids.device)
    if table.shape[0] == 0:  # more ranks than vocabulary rows: this one holds none
        rows = table.new_zeros((local.shape[0], table.shape[1]))
    else:
        rows = torch.where(inside[:, None], table[local.clamp(0, table.shape[0] - 1)],
                           torch.zeros((), dtype=table.dtype, device=table.device))
    return _return_rows(rows, most, flat.numel(), shard).reshape(*ids.shape, -1)


class _ChunkedLogProb(torch.autograd.Function):
    """Per-row ``log_softmax(hidden @ weight.T / temperature)[target]``, chunk by chunk, never the
    whole (rows, vocab) logits; the gradient w.r.t. ``hidden`` is formed in the forward pass, so the
    backward keeps (M, H) rather than (M, vocab) and needs no collective. ``weight`` is frozen.

    ``shard`` None: ``weight`` is the whole (vocab, H) head. Otherwise ``weight`` is this rank's
    vocabulary rows (``shard.local``): the ranks exchange their hidden rows and targets, each works
    on its own rows of the vocabulary for everyone's tokens (the max and the sums all-reduced), and
    the gradients go back to their owners with one reduce-scatter.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                shard: Optional[VocabShard], most: Optional[int] = None) -> torch.Tensor:
        count = hidden.shape[0]
        if shard is None:
            every, wanted, most, first = hidden.detach(), targets, count, 0
        else:
            every, most = _gather_rows(hidden.detach(), shard, most)
            wanted, _ = _gather_rows(targets, shard, most)  # as many rows as the hidden states
            first = shard.start
        weight = weight.to(hidden.device)
        rows = weight.shape[0]
        out = torch.empty(every.shape[0], dtype=torch.float32, device=hidden.device)
        grad = None
        if hidden.requires_grad:  # partial sums across ranks stay fp32 until they are reduced
            grad = torch.zeros(every.shape, dtype=hidden.dtype if shard is None else torch.float32, device=hidden.device)
        for start in range(0, every.shape[0], CHUNK_ROWS):
            h = every[start:start + CHUNK_ROWS]
            y = wanted[start:start + CHUNK_ROWS] - first
            logits = (h @ weight.T).float() / temperature  # (chunk, vocabulary rows held here)
            if shard is None:
                lse = torch.logsumexp(logits, dim=-1)
                out[start:start + CHUNK_ROWS] = logits.gather(1, y[:, None]).squeeze(1) - lse
                hit = torch.arange(len(y), device=y.device)
            else:
                inside = (y >= 0) & (y < rows)
                top = logits.amax(-1) if rows else torch.full((h.shape[0],), -torch.inf, device=h.device)
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=shard.group)
                picked = logits.gather(1, y.clamp(0, max(rows - 1, 0))[:, None]).squeeze(1) if rows else top * 0
                sums = torch.stack([torch.exp(logits - top[:, None]).sum(-1), torch.where(inside, picked, 0.0)])
                dist.all_reduce(sums, group=shard.group)
                lse = top + torch.log(sums[0])
                out[start:start + CHUNK_ROWS] = sums[1] - lse
                hit = inside.nonzero().squeeze(1)
            if grad is not None:
                # d logp / d logits = onehot - softmax (over the columns held here); the 1/temperature
                # comes from the chain rule
                probs = -torch.exp(logits - lse[:, None])
                probs[hit, y[hit]] += 1.0
                grad[start:start + CHUNK_ROWS] = ((probs / temperature).to(weight.dtype) @ weight).to(grad.dtype)
        if shard is not None:
            out = out[shard.rank * most:shard.rank * most + count].clone()
            grad = _return_rows(grad, most, count, shard).to(hidden.dtype) if grad is not None else None
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output[:, None].to(grad.dtype), None, None, None, None, None


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``targets`` under a whole, frozen head, chunk by chunk.

    Args:
        hidden: (M, H) final hidden states.
        weight: (vocab, H) the head's weight.
        targets: (M,) long token ids.
        temperature: logits are divided by it first.

    Returns:
        (M,) fp32 log-probs; differentiable w.r.t. ``hidden``.
    """
    return _ChunkedLogProb.apply(hidden, weight, targets, float(temperature), None)


# Exchange hidden rows while the group's rows (world x most) stay under this fraction of the
# vocabulary; past it, gather the head instead. Per rank, the exchange moves ~world x most x H in
# (the rows) and as much out (their fp32 gradients, reduce-scattered), the head gather vocab x H in;
# the logits' compute is the same either way (most x vocab per rank).
GATHER_HEAD_ABOVE = 0.5
stats = {"head_gathers": 0, "row_exchanges": 0}  # which path ran, for tests and logs


def sharded_logprobs(hidden: torch.Tensor, targets: torch.Tensor, shard: VocabShard,
                     temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``targets`` under a head sharded by vocabulary rows.

    Exchanges the ranks' hidden rows (each rank scores everyone's tokens on its own vocabulary
    rows) while they are few; once ``world x most rows`` passes ``GATHER_HEAD_ABOVE`` of the
    vocabulary, gathering the (frozen) head whole costs less and each rank scores its own rows.
    Every rank takes the same path (the decision uses the group's largest row count).

    Args:
        hidden: (M, H) this rank's final hidden states (M may differ between ranks, or be 0).
        targets: (M,) long token ids.
        shard: the head's ``vocab_shard``.
        temperature: logits are divided by it first.

    Returns:
        (M,) fp32 log-probs; differentiable w.r.t. ``hidden``.
    """
    most = _most_rows(hidden.shape[0], shard, hidden.device)
    if shard.param is not None and shard.world * most > GATHER_HEAD_ABOVE * shard.vocab:
        stats["head_gathers"] += 1
        with torch.no_grad():
            whole = shard.param.full_tensor()
        return _ChunkedLogProb.apply(hidden, whole, targets, float(temperature), None)
    stats["row_exchanges"] += 1
    return _ChunkedLogProb.apply(hidden, shard.local, targets, float(temperature), shard, most)


class ShardedEmbedding(nn.Module):
    """Stands in for a frozen ``nn.Embedding`` that FSDP2 sharded as its own unit: looks tokens up
    in the shards (``sharded_lookup``) and never calls the embedding, so FSDP2 never gathers it."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shard = vocab_shard(self.embedding.weight)
        if shard is None:  # gathered right now (a tied head's forward is running): use it whole
            return self.embedding.weight[ids]
        return sharded_lookup(ids, shard)
