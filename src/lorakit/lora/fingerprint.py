"""What an adapter is, in a few bytes: a hash of its values, or a stamp of its live tensors.

A rollout backend reports one of these for the adapter it samples with, computed on its own side
(the server from the file it read, a local backend from the tensors it runs), and the trainer
compares it with its own: a sync that did not land is caught instead of trained on.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .tree import unwrap_model
from .io import PEFT_PREFIX, _adapter_tensors


def adapter_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of an adapter's tensors (names, shapes, fp32 values): equal iff the weights are.

    Keys are taken with or without PEFT's ``base_model.model.`` prefix (what ``adapter_state_dict``
    gives and what ``read_adapter`` gives hash alike); values of any dtype hash as their exact fp32
    (a bf16 file and the bf16 tensors it was written from agree).

    Args:
        tensors: PEFT-keyed tensors, any device or dtype (hashed as fp32 on the CPU).
    """
    digest = hashlib.blake2b(digest_size=8)
    named = {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}
    for key in sorted(named):
        value = named[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def adapter_stamp(model: nn.Module, adapter_name: str = "default") -> str:
    """Which tensors hold adapter ``adapter_name`` and how often each was written in place.

    Built from each live tensor's identity and its in-place version counter (``Tensor._version``,
    which every in-place write bumps: an optimizer step, a ``copy_``), so it changes whenever the
    adapter's weights may have, without reading a value: no copy, no gather of FSDP2 shards. Two
    stamps are equal only for the same tensor objects, unwritten in between.
    """
    tensors = _adapter_tensors(unwrap_model(model), adapter_name)
    digest = hashlib.blake2b(digest_size=8)
    for key in sorted(tensors):
        digest.update(f"{key}:{id(tensors[key])}:{tensors[key]._version};".encode())
    return "stamp-" + digest.hexdigest()
