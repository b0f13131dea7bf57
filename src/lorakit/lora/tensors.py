"""Tensor helpers shared by the core and the training code."""

from __future__ import annotations

import torch


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor: a DTensor (FSDP2 shards parameters as DTensors) is gathered,
    a plain tensor is returned as is.

    Gathering is a collective: under FSDP2 every rank must call this for the same tensor.
    Detected by the ``full_tensor`` method rather than an import, so the core needs no
    ``torch.distributed.tensor``.
    """
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def local_region(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The part of the whole tensor that this rank holds: a DTensor's own shard, or everything."""
    mesh = getattr(tensor, "device_mesh", None)
    if mesh is None or not hasattr(tensor, "to_local"):
        return tuple(slice(0, n) for n in tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def copy_whole_(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy the whole value ``whole`` into ``target``, in place: a DTensor (an FSDP2-sharded
    parameter) takes only its own shard's region, so loading into a sharded model needs no
    collective; a plain tensor takes all of it."""
    if getattr(target, "device_mesh", None) is not None and hasattr(target, "to_local"):
        local = target.to_local()
        local.copy_(whole[local_region(target)].to(local.device))
    else:
        target.copy_(whole)
