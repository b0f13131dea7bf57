"""torchrun launch, DDP and FSDP2 wrapping, and the few collectives a recipe needs.

lorakit runs on PyTorch's own engine: processes come from ``torchrun`` (any number of nodes), data
parallelism from ``DistributedDataParallel``, sharding from FSDP2's ``fully_shard``. LoRA is
injected before wrapping. On CPU the backend is gloo, on GPU nccl.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..lora.tensors import full_tensor  # noqa: F401  (one implementation, for the recipes)


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


def wrap(module: LossModule, info: DistInfo, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """DDP, or FSDP2 (each block, then the root), around the loss module."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if info.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {}
        if device.type == "cuda" and compute_dtype != torch.float32:
            # Compute in bf16/fp16, reduce gradients in fp32; stored LoRA weights stay fp32.
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in decoder_layers(module.model):
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)
        return module
    return module


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


def barrier(info: DistInfo) -> None:
    if info.mode != "none":
        dist.barrier()
