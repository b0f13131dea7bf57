"""torchrun launch, DDP and FSDP2 wrapping, and the few collectives a recipe needs.

lorakit runs on PyTorch's own distributed stack: processes come from ``torchrun`` (any number of nodes), data
parallelism from ``DistributedDataParallel``, sharding from FSDP2's ``fully_shard``. LoRA is
injected before wrapping. On CPU the backend is gloo, on GPU nccl.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..lora.tensors import full_tensor  # noqa: F401  (one implementation, for the recipes)
from ..models.head import is_fsdp_unit, plain_head


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"
    """none | ddp | fsdp2"""

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(mode: str, device_type: str, timeout_s: float) -> DistInfo:
    """Join the torchrun job (if any) and decide the mode (default: ddp when world size > 1).

    Collectives time out after ``timeout_s``, so a rank that dies never leaves the others hanging.
    """
    world = launched_world_size()
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none":
        if world > 1:
            raise ValueError("train.distributed=none but the job was launched with several processes")
        return DistInfo()
    if world == 1 and "RANK" not in os.environ:
        # fsdp2/ddp asked for in a plain process: a one-rank group keeps one code path.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if mode == "fsdp2" and device_type == "cpu":
        return_freed_memory()  # before the model is built: FSDP2 frees and regathers blocks all the time
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, mode)


def shutdown(info: DistInfo) -> None:
    if info.mode != "none" and dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """The model plus its loss in one forward, so DDP and FSDP2 see the whole step through their root."""

    def __init__(self, model: nn.Module, loss_fn: Any) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, n = self.loss_fn(self.model, batch)
        return loss_sum, torch.tensor(n, device=loss_sum.device)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF causal LM (what FSDP2 shards one by one)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to shard with FSDP2")


def embedding_units(model: nn.Module) -> list[tuple[Any, bool]]:
    """The input embedding and the output head, each its own FSDP2 unit (one unit when tied), and
    whether the backward needs the unit's weights.

    Left in the root, FSDP2 would keep them gathered whole from the start of the forward to the end
    of the backward (the root never reshards after forward): on a 150k vocabulary that is the
    largest block of a small model, on every rank. As their own units they are gathered only
    around their own forward, and a frozen plain embedding and a plain head never are: lookups and
    the loss work on the shards (``look_up_in_shards``, ``vocab``). A tied unit that does gather
    for a lookup is freed right after it (see ``wrap``). A frozen embedding and a plain head are
    not needed in backward (token ids take no gradient; the loss forms its gradient in the forward
    pass), so FSDP2 must not prefetch them there either.
    """
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    units: list[Any] = [m for m in (embed, head) if m is not None and any(True for _ in m.parameters())]
    if len(units) == 2 and {id(p) for p in embed.parameters()} & {id(p) for p in head.parameters()}:
        units = [[embed, head]]  # tied weights: one parameter cannot live in two units

    def needed(unit: Any) -> bool:
        modules = unit if isinstance(unit, list) else [unit]
        if any(p.requires_grad for m in modules for p in m.parameters()):
            return True
        return any(m is head for m in modules) and not plain_head(model)

    return [(unit, needed(unit)) for unit in units]


def look_up_in_shards(model: nn.Module) -> bool:
    """Put a ``vocab.ShardedEmbedding`` in place of a frozen plain embedding that FSDP2 sharded as
    its own unit, so token lookups never gather the vocabulary. Returns whether it did."""
    from .vocab import ShardedEmbedding

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    plain = embed is not None and is_fsdp_unit(embed) and type(embed).__bases__[-1] is nn.Embedding
    if not plain or embed.weight.requires_grad or embed.max_norm is not None:
        return False
    model.set_input_embeddings(ShardedEmbedding(embed))
    return True


def _reshard_after_lookup(embedding: nn.Module, _args: Any, _output: Any) -> None:
    """Forward hook of a tied embedding: free the gathered weight once the lookup is done (the head
    gathers it again if it runs: ``training.loss`` or its own FSDP2 pre-forward)."""
    embedding.reshard()


@dataclass
class FsdpOptions:
    """How FSDP2 shards the model (train.fsdp_replicate, train.cpu_offload) and, when the base was
    built on meta (``sharded_load``), the checkpoint its shards are read from."""

    replicate: int = 1
    """Replica groups of a 2-D (HSDP) mesh: shard within each group, all-reduce across groups."""
    cpu_offload: bool = False
    """Keep sharded parameters (and their gradients) in host memory; FSDP2 copies them in per block."""
    checkpoint: Any = None
    """A ``sharded_load.CheckpointIndex`` when the model's base is on meta: read shards from it."""
    loaded: Any = None
    """After ``wrap``: this rank's ``sharded_load.LoadStats``."""


def return_freed_memory() -> None:
    """Make glibc give freed memory back to the OS at once (fixed 1 MiB mmap threshold, trim threshold 0).

    FSDP2 on CPU gathers each block's weights, frees them after the block, and gathers the next:
    with glibc's default (a trim threshold that grows with the largest free), those freed blocks
    stay in the process, and a 2-rank run on a 519M model kept ~0.9 GB per rank it no longer used
    (measured: peak RSS 3.05 GB -> 2.20 GB per rank). GPU memory has its own allocator; this is for
    host memory only. No-op where the C library has no ``mallopt``.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks from 1 MiB up are mapped, unmapped when freed
            libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: the heap's free top goes back at once
    except OSError:
        pass


def device_mesh(info: DistInfo, device: torch.device, replicate: int = 1) -> Any:
    """The FSDP2 mesh: 1-D over all ranks, or (replicate, world / replicate) for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicate > 1:
        return init_device_mesh(device.type, (replicate, info.world // replicate),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (info.world,), mesh_dim_names=("shard",))


def wrap(module: LossModule, info: DistInfo, device: torch.device, compute_dtype: torch.dtype,
         fsdp: Optional[FsdpOptions] = None) -> nn.Module:
    """DDP, or FSDP2 (each block, then the root), around the loss module.

    Under FSDP2 with ``fsdp.checkpoint`` set, the base is still on meta: it is sharded first, then
    each rank allocates and reads only its own shards (``sharded_load``).
    """
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if info.mode == "fsdp2":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        fsdp = fsdp or FsdpOptions()
        kwargs: dict[str, Any] = {"mesh": device_mesh(info, device, fsdp.replicate)}
        if device.type == "cuda" and compute_dtype != torch.float32:
            # Compute in bf16/fp16, reduce gradients in fp32; stored LoRA weights stay fp32.
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if fsdp.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        kept = None
        if fsdp.checkpoint is not None:
            from .sharded_load import snapshot_real

            kept = snapshot_real(module)
        layers = decoder_layers(module.model)
        for layer in layers:
            fully_shard(layer, **kwargs)
        if device.type == "cpu":
            # gloo's all-gathers block the caller (no streams to overlap on): a block FSDP2
            # prefetches in backward is only held longer, next to the one being computed. Naming
            # each block itself as its prefetch (a no-op) turns the default one-ahead off.
            for layer in layers:
                layer.set_modules_to_backward_prefetch([layer])
        for unit, in_backward in embedding_units(module.model):
            sharded = fully_shard(unit, **kwargs)
            parts = sharded if isinstance(sharded, list) else [sharded]
            if not in_backward:
                for part in parts:
                    part.set_unshard_in_backward(False)
            if len(parts) > 1:
                # FSDP2 reshards a unit of several modules only once each has run forward; the loss
                # never calls a plain head, so the tied weight would stay whole through the forward.
                parts[0].register_forward_hook(_reshard_after_lookup)
        fully_shard(module, **kwargs)
        if kept is not None:
            from .sharded_load import finish_adapter_init, load_sharded

            # Offloaded shards live in host memory: allocate them there, not on the GPU first.
            home = torch.device("cpu") if fsdp.cpu_offload else device
            fsdp.loaded = load_sharded(module, fsdp.checkpoint, kept, home)
            finish_adapter_init(module, fsdp.loaded)  # DoRA, PiSSA/OLoRA: one module's base gathered at a time
        look_up_in_shards(module.model)  # after loading: the checkpoint's names are the model's own
        return module
    return module


def through_root(root: nn.Module, info: DistInfo, fn: Callable[[nn.Module], Any]) -> Any:
    """``fn(model)`` for the model inside the wrapped ``root``, run where it can run: under FSDP2
    inside the root's forward (a forward must enter through the root, which gathers the root's own
    shards; every rank must call this), otherwise directly."""
    inner = root.module if info.mode == "ddp" else root
    if info.mode != "fsdp2":
        return fn(inner.model)
    result: list[Any] = []
    loss_fn = inner.loss_fn

    def run(model: nn.Module, _batch: Any) -> tuple[torch.Tensor, int]:
        result.append(fn(model))
        return torch.zeros(()), 0

    inner.loss_fn = run
    try:
        with torch.no_grad():
            root({})
    finally:
        inner.loss_fn = loss_fn
    return result[0]


def any_rank(info: DistInfo, device: torch.device) -> Callable[[bool], bool]:
    """``flag -> whether any rank's flag is True``: an all-reduce every rank must call as often as
    the others (the generation engine's ``lockstep`` under FSDP2)."""
    def anyone(flag: bool) -> bool:
        if info.mode == "none":
            return flag
        tensor = torch.tensor([int(flag)], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    return anyone


def all_reduce_sum(value: float, info: DistInfo, device: torch.device) -> float:
    if info.mode == "none":
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Shard a whole tensor the way ``param`` is sharded (a plain copy for a plain parameter)."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return full.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(mesh.device_type), mesh, param.placements)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if info.mode == "none":
        return [obj]
    out: list[Optional[Any]] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(tensors: dict[str, torch.Tensor], info: DistInfo) -> Optional[dict[str, torch.Tensor]]:
    """The whole value of each tensor, on the main rank only (None on the others), on the CPU.

    A sharded tensor (FSDP2's DTensor) travels as each rank's own shard, point to point, to rank 0,
    which alone assembles it (the shards' offsets and shapes go first, gathered to rank 0): rank 0
    receives the whole, every other rank receives nothing and sends only its shard, so the cost
    per rank does not grow with the world size (an all-gather puts the whole on every rank). A
    plain tensor is whole on every rank already: rank 0 takes its own. Every rank must call this
    with the same keys (a collective when any tensor is sharded).
    """
    sharded = [k for k, v in tensors.items() if hasattr(v, "device_mesh")]
    whole = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if k not in sharded} if info.main else {}
    if sharded and info.mode == "none":  # a one-process mesh: the shard is the whole
        whole.update({k: tensors[k].full_tensor().detach().to("cpu").contiguous() for k in sharded})
    elif sharded:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = {k: tensors[k].to_local().detach().contiguous() for k in sharded}
        offsets = {k: tuple(compute_local_shape_and_global_offset(tensors[k].shape, tensors[k].device_mesh,
                                                                  tensors[k].placements)[1]) for k in sharded}
        layout = gather_objects_to_main({k: (offsets[k], tuple(local[k].shape)) for k in sharded}, info)
        for key in sharded:  # in the same order on every rank: the sends and receives pair up
            if not info.main:
                if local[key].numel():
                    dist.send(local[key], dst=0)
                continue
            full = torch.empty(tensors[key].shape, dtype=tensors[key].dtype)
            for rank, shards in enumerate(layout):
                offset, shape = shards[key]
                if not math.prod(shape):
                    continue
                if rank == 0:
                    piece = local[key]
                else:
                    piece = torch.empty(shape, dtype=local[key].dtype, device=local[key].device)
                    dist.recv(piece, src=rank)
                full[tuple(slice(o, o + n) for o, n in zip(offset, shape))] = piece.to("cpu")
            whole[key] = full
    return {k: whole[k] for k in tensors} if info.main else None


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """``obj`` as the main rank has it, on every rank (what the other ranks pass is ignored)."""
    if info.mode == "none":
        return obj
    box = [obj if info.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects_to_main(obj: Any, info: DistInfo) -> Optional[list[Any]]:
    """Every rank's ``obj`` on the main rank (rank order), None on the others."""
    if info.mode == "none":
        return [obj]
    out: Optional[list[Any]] = [None] * info.world if info.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    if info.mode != "none":
        dist.barrier()
