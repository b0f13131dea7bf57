"""What the Megatron torchrun workers (tests/megatron_worker.py, tests/megatron_moe_worker.py) share.

CPU shims for megatron-core 0.16 (test-only; Megatron's own code paths, not lorakit's):

megatron-core allocates the buffers of its sequence-parallel collectives and RoPE's frequencies on
``torch.cuda.current_device()``, its attention forks the CUDA RNG tracker, and without Transformer
Engine its MoE router reads a module global (``te_general_gemm``) that is never defined. On CPU:
``torch.cuda.current_device`` points at "cpu", the RNG tracker's fork is a no-op (dropout is 0 in
these tests) and the missing global is set to None (the router's own torch path). Nothing is
patched on CUDA.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch


def point_cuda_device_at_cpu() -> None:
    """Before megatron-core is imported: its CPU-side allocations ask for the current CUDA device."""
    import torch

    torch.cuda.current_device = lambda: "cpu"


def patch_megatron_for_cpu() -> None:
    """After ``initialize_model_parallel``: the RNG tracker fork and the MoE router's TE global."""
    from megatron.core import tensor_parallel
    import megatron.core.tensor_parallel.random as _random
    import megatron.core.transformer.moe.moe_utils as _moe_utils

    class _NoFork:
        def fork(self, name=None):
            return contextlib.nullcontext()

    def _tracker(*args, **kwargs):
        return _NoFork()

    tensor_parallel.get_cuda_rng_tracker = _tracker
    _random.get_cuda_rng_tracker = _tracker
    if not hasattr(_moe_utils, "te_general_gemm"):
        _moe_utils.te_general_gemm = None


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in float64 on the CPU."""
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def export_checks(model: torch.nn.Module, adapter: Path, make_hf: Callable[[], torch.nn.Module], ids: torch.Tensor,
                  megatron_logits: torch.Tensor, rank: int) -> dict:
    """Export the Megatron model's adapter to HF PEFT format (a collective); on rank 0, the logits
    of the HF model with it loaded by lorakit and by the real ``peft`` against Megatron's, and the
    written adapter_config.json."""
    import json

    from peft import PeftModel

    from lorakit import load_adapter
    from lorakit.integrations import megatron as mlora

    mlora.export_hf_adapter([model], adapter)
    if rank != 0:
        return {}
    ours = make_hf()
    load_adapter(ours, adapter)
    theirs = PeftModel.from_pretrained(make_hf(), str(adapter))
    with torch.no_grad():
        return {"lorakit_vs_megatron": maxdiff(ours(ids).logits, megatron_logits),
                "peft_vs_megatron": maxdiff(theirs(ids).logits, megatron_logits),
                "config": json.loads((adapter / "adapter_config.json").read_text())}


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of this rank's LoRA tensors, by state-dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def randomize_full_lora(model: torch.nn.Module, generator_for: Callable[..., torch.Generator], scale: float = 0.1) -> None:
    """Give every LoRA layer full A/B drawn from ``generator_for(info)`` (the same on every rank),
    keeping this rank's shards."""
    from lorakit.integrations import megatron as mlora

    for info, layer in mlora.module_infos([model]):
        g = generator_for(info)
        shapes = layer.full_shapes("default")
        with torch.no_grad():
            for which, store in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                store["default"].weight.copy_(layer.shard(which, torch.randn(shapes[which], generator=g) * scale))
