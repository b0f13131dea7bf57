"""Tensor-parallel LoRA: adapters on column- and row-parallel linear layers (Megatron-core style).

The core knows nothing of Megatron: a :class:`ParallelLoraLinear` wraps any base layer that
follows Megatron's tensor-parallel contract, given the tensor-parallel process group and the
layer's full sizes. ``lorakit.integrations.megatron`` detects Megatron's layers and builds these.

The contract (Megatron's ``ColumnParallelLinear`` / ``RowParallelLinear``, TP size ``t``):

* column-parallel: weight shard ``(out / t, in)``; the input is the full activation, replicated on
  every rank (or, with sequence parallelism, split along the sequence (dim 0) and all-gathered
  inside the layer); each rank outputs its ``out / t`` slice of the features.
* row-parallel: weight shard ``(out, in / t)``; the input is already split along features; the
  partial outputs are all-reduced (or reduce-scattered along the sequence under sequence
  parallelism), so every rank outputs the full features.
* ``forward`` returns ``(output, output_bias)``.

The LoRA update is sharded like the weight, so that on each rank ``B @ A`` has exactly the shape
of its weight shard and the shards of ``B @ A`` are the shards of the dense ``B_full @ A_full``:

* column: ``A`` (r, in) replicated, ``B`` (out / t, r) sharded along its rows;
* row: ``A`` (r, in / t) sharded along its columns, ``B`` (out, r) replicated.

Only the small ``(tokens, r)`` intermediate ever crosses ranks. Gradients are exact without any
help from the training loop: the autograd functions below reduce what is partial, so every
replicated LoRA weight ends up with the same full gradient on every tensor-parallel rank.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layer import LoraLayer

COLUMN = "column"
ROW = "row"


# --- collectives with their autograd duals -----------------------------------------------------
def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """World size of ``group`` (1 when torch.distributed is not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


class _AllReduceInBackward(torch.autograd.Function):
    """Identity forward; all-reduce (sum) the gradient in backward.

    For a tensor used identically on every rank whose downstream use is split across ranks: each
    rank's gradient is a partial sum (Megatron's ``copy_to_tensor_model_parallel_region``).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllReduceInForward(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (``reduce_from_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 forward; reduce-scatter along dim 0 backward.

    The gathered tensor feeds a computation whose result is split across ranks, so each rank's
    gradient for the whole sequence is partial: sum them and keep this rank's chunk.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        world = group_size(group)
        x = x.contiguous()
        out = x.new_empty((x.shape[0] * world, *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        world = group_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Reduce-scatter along dim 0 forward; all-gather along dim 0 backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        world = group_size(group)
        x = x.contiguous()
        if x.shape[0] % world:
            raise RuntimeError(f"sequence parallelism: dim 0 ({x.shape[0]}) is not divisible by the TP size {world}")
        out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        world = group_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] * world, *grad.shape[1:]))
        dist.all_gather_into_tensor(out, grad, group=ctx.group)
        return out, None


# --- shard layout -------------------------------------------------------------------------------
def shard_tensor(full: torch.Tensor, dim: int, rank: int, world: int, stride: int = 1) -> torch.Tensor:
    """This rank's shard of ``full`` along ``dim``, in Megatron's (strided) layout.

    ``full`` is cut into ``world * stride`` equal pieces; rank ``i`` holds pieces ``i, i + world,
    ...`` concatenated. Stride 2 is SwiGLU's ``linear_fc1``: the full ``[gate; up]`` gives each
    rank ``[gate_i; up_i]``.
    """
    if full.shape[dim] % (world * stride):
        raise ValueError(f"cannot shard size {full.shape[dim]} along dim {dim} into {world} ranks x stride {stride}")
    pieces = full.chunk(world * stride, dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def unshard_tensor(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from every rank's shard, in rank order."""
    world = len(shards)
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[rank][k] for k in range(stride) for rank in range(world)], dim=dim)


# --- the layer ----------------------------------------------------------------------------------
class ParallelLoraLinear(LoraLayer):
    """LoRA on a tensor-parallel linear layer whose forward returns ``(output, output_bias)``.

    ``y = base(x) + B(A(dropout(x))) * scale``, computed shard by shard (see the module docstring
    for the layout). The wrapper returns the base layer's ``(output, output_bias)`` tuple with the
    LoRA update added to ``output``; ``output_bias`` (Megatron's ``skip_bias_add``) is untouched.

    Args:
        base_layer: the parallel linear layer; its ``weight`` is this rank's shard.
        parallel_mode: ``"column"`` or ``"row"``.
        in_features: full input size (all ranks together).
        out_features: full output size (all ranks together).
        tp_group: the tensor-parallel process group (None: the default group).
        sequence_parallel: activations outside the layer are split along dim 0 (the sequence).
        partition_stride: Megatron's stride of the output shard (2 for SwiGLU ``linear_fc1``);
            only changes how full tensors map to shards (init, import, export).
        reduces_output: a row-parallel layer sums its partial outputs itself (True, Megatron's
            default); False for MoE expert layers (``explicit_expert_comm``), whose partial outputs
            the token dispatcher sums after the layer, so the LoRA update is left partial too.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        parallel_mode: str,
        in_features: int,
        out_features: int,
        tp_group: Optional[dist.ProcessGroup] = None,
        sequence_parallel: bool = False,
        partition_stride: int = 1,
        reduces_output: bool = True,
    ) -> None:
        super().__init__(base_layer)
        if parallel_mode not in (COLUMN, ROW):
            raise ValueError(f"parallel_mode must be 'column' or 'row', got {parallel_mode!r}")
        self.parallel_mode = parallel_mode
        self.in_features = in_features
        self.out_features = out_features
        self.tp_group = tp_group
        self.tp_world = group_size(tp_group)
        self.tp_rank = group_rank(tp_group)
        self.sequence_parallel = bool(sequence_parallel) and self.tp_world > 1
        self.partition_stride = partition_stride
        self.reduces_output = reduces_output
        split = out_features if parallel_mode == COLUMN else in_features
        if split % self.tp_world:
            raise ValueError(f"{parallel_mode}-parallel size {split} is not divisible by the TP size {self.tp_world}")
        if parallel_mode == COLUMN:
            self.in_local, self.out_local = in_features, out_features // self.tp_world
        else:
            self.in_local, self.out_local = in_features // self.tp_world, out_features
        weight = getattr(base_layer, "weight", None)
        if weight is None:
            raise ValueError(f"{type(base_layer).__name__} has no weight of its own; LoRA needs one to merge into")
        if tuple(weight.shape) != (self.out_local, self.in_local):
            raise ValueError(
                f"{type(base_layer).__name__}: weight shard is {tuple(weight.shape)}, expected "
                f"{(self.out_local, self.in_local)} for a {parallel_mode}-parallel {in_features}->{out_features} "
                f"layer on {self.tp_world} rank(s)"
            )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    # --- layout ------------------------------------------------------------------------------
    @property
    def sharded(self) -> dict[str, Optional[int]]:
        """Which dim of ``lora_A`` / ``lora_B`` weights is split across TP ranks (None: replicated)."""
        return {"lora_A": None, "lora_B": 0} if self.parallel_mode == COLUMN else {"lora_A": 1, "lora_B": None}

    def full_shapes(self, name: str) -> dict[str, tuple[int, int]]:
        """Shapes of adapter ``name``'s A and B when gathered from all ranks."""
        r = self.r[name]
        return {"lora_A": (r, self.in_features), "lora_B": (self.out_features, r)}

    def shard(self, which: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full ``lora_A`` / ``lora_B`` weight."""
        dim = self.sharded[which]
        if dim is None:
            return full
        stride = self.partition_stride if which == "lora_B" else 1
        return shard_tensor(full, dim, self.tp_rank, self.tp_world, stride)

    def gather(self, which: str, local: torch.Tensor) -> torch.Tensor:
        """The full ``lora_A`` / ``lora_B`` weight from every rank's shard (a collective)."""
        dim = self.sharded[which]
        if dim is None or self.tp_world == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp_world)]
        dist.all_gather(parts, local.contiguous(), group=self.tp_group)
        stride = self.partition_stride if which == "lora_B" else 1
        return unshard_tensor(parts, dim, stride)

    # --- adapters ----------------------------------------------------------------------------
    def _stores(self) -> list[Any]:
        return [self.lora_A, self.lora_B]

    def _create_weights(self, name: str, r: int, factory: dict[str, Any]) -> None:
        self.lora_A[name] = nn.Linear(self.in_local, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_local, bias=False, **factory)

    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """Initialise as dense LoRA would the full A and B, then keep this rank's shards.

        The full tensors are drawn on TP rank 0 and broadcast (a collective), so replicated
        weights are identical on every rank and sharded ones are the shards of one dense draw.
        """
        a_local, b_local = self.lora_A[name].weight, self.lora_B[name].weight
        shapes = self.full_shapes(name)
        a = torch.empty(shapes["lora_A"], dtype=a_local.dtype, device=a_local.device)
        b = torch.empty(shapes["lora_B"], dtype=b_local.dtype, device=b_local.device)
        with torch.no_grad():
            if init is False:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                if init == "gaussian":
                    nn.init.normal_(a, std=1.0 / self.r[name])
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            if self.tp_world > 1:
                src = dist.get_global_rank(self.tp_group, 0) if self.tp_group is not None else 0
                dist.broadcast(a, src=src, group=self.tp_group)
                dist.broadcast(b, src=src, group=self.tp_group)
            a_local.copy_(self.shard("lora_A", a))
            b_local.copy_(self.shard("lora_B", b))

    def delta_weight(self, name: str) -> torch.Tensor:
        """This rank's shard of ``scale * B @ A``, float32, shaped like the local weight shard."""
        a = self.lora_A[name].weight.detach().float()
        b = self.lora_B[name].weight.detach().float()
        return (b @ a) * self.scaling[name]

    # --- forward -----------------------------------------------------------------------------
    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation the LoRA branch reads (the layer's input; a fused-norm layer overrides it)."""
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.row_routes is not None:
            raise RuntimeError("per-row adapter routing is not supported on tensor-parallel LoRA layers")
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled and self.merged_adapters:
            result, bias = self._check_pair(out)
            h_in = self.lora_input(x)
            for name in self.merged_adapters:  # see LoraLayer._without_merged
                result = (result - self._parallel_delta(h_in, name, merged=True)).to(result.dtype)
            return result, bias
        if self.disabled or not self._live:
            return out
        result, bias = self._check_pair(out)
        h_in = self.lora_input(x)
        for name in self._live:
            result = result + self._parallel_delta(h_in, name).to(result.dtype)
        return result, bias

    def _check_pair(self, out: Any) -> tuple[torch.Tensor, Any]:
        if not isinstance(out, tuple) or len(out) != 2:
            raise RuntimeError(
                f"{type(self.base_layer).__name__} returned {type(out).__name__}; a tensor-parallel LoRA "
                "layer expects the (output, output_bias) pair of Megatron's parallel linear layers"
            )
        return out[0], out[1]

    def _parallel_delta(self, x: torch.Tensor, name: str, merged: bool = False) -> torch.Tensor:
        """This rank's part of ``B(A(dropout(x))) * scale``, laid out like the base output.

        ``merged``: the update a merged adapter put into the weight (no dropout, no gradient to
        A and B), which a disabled layer takes out of its output.

        Shapes (s = sequence, b = batch, t = TP size; under sequence parallelism the column input
        and the row output have s / t rows):
            column: x (s, b, in) -> h (s, b, r) -> delta (s, b, out / t)
            row:    x (s, b, in / t) -> partial h (s, b, r) -> summed h -> delta (s, b, out)
        """
        a = self.lora_A[name].weight
        b = self.lora_B[name].weight
        group = self.tp_group
        if merged:
            a, b = a.detach(), b.detach()
        else:
            x = self.lora_dropout[name](x)
        x = x.to(a.dtype)
        if self.tp_world == 1:
            return F.linear(F.linear(x, a) * self.scaling[name], b)
        if self.parallel_mode == COLUMN:
            if self.sequence_parallel:
                # A is replicated but each rank only sees its sequence chunk: its gradient is a
                # partial sum over chunks, summed across ranks in backward.
                h = F.linear(x, _AllReduceInBackward.apply(a, group))
                h = _GatherSequence.apply(h, group)
            else:
                # Every rank computes the same h; B's shards make its gradient partial: sum it,
                # which also gives x and A their full gradients.
                h = _AllReduceInBackward.apply(F.linear(x, a), group)
            return F.linear(h * self.scaling[name], b)
        h = F.linear(x, a)  # partial: this rank's input features only
        if not self.reduces_output:
            # MoE experts: the dispatcher sums the ranks' partial outputs after the layer, so
            # B(h_partial) is summed there too; B is replicated but sees a partial h on each
            # rank, so its gradient is partial: sum it across ranks in backward.
            return F.linear(h * self.scaling[name], _AllReduceInBackward.apply(b, group))
        if self.sequence_parallel:
            h = _ReduceScatterSequence.apply(h, group)
            # B is replicated but each rank sees its sequence chunk: sum B's gradient across ranks.
            b = _AllReduceInBackward.apply(b, group)
        else:
            h = _AllReduceInForward.apply(h, group)
        return F.linear(h * self.scaling[name], b)

    # --- loading a LoRA-free state dict ------------------------------------------------------
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint of the model before LoRA has `<prefix>weight`, not `<prefix>base_layer.weight`:
        # map such keys onto the base layer, so a base checkpoint loads into an injected model.
        # LoRA keys it lacks are reported missing by load_state_dict, as they should be.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if not rest.startswith(("base_layer.", "lora_A.", "lora_B.", "lora_dropout.")):
                state_dict[prefix + "base_layer." + rest] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        layout = f"{self.parallel_mode}-parallel {self.in_features}->{self.out_features}, tp={self.tp_world}"
        if self.sequence_parallel:
            layout += ", sequence_parallel"
        if not self.reduces_output:
            layout += ", output reduced outside"
        return ", ".join([layout] + [f"{n}: r={self.r[n]} scale={self.scaling[n]:g}" for n in self.r])
