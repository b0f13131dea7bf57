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
