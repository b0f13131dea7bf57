"""CPU shims for megatron-core 0.16 under torchrun workers (test-only; Megatron's own code paths).

megatron-core allocates the buffers of its sequence-parallel collectives and RoPE's frequencies on
``torch.cuda.current_device()``, its attention forks the CUDA RNG tracker, and without Transformer
Engine its MoE router reads a module global (``te_general_gemm``) that is never defined. On CPU:
``torch.cuda.current_device`` points at "cpu", the RNG tracker's fork is a no-op (dropout is 0 in
these tests) and the missing global is set to None (the router's own torch path). Nothing is
patched on CUDA.
"""

from __future__ import annotations

import contextlib


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
