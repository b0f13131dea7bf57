"""The output head as lorakit's losses see it.

The losses (``training.loss``) apply a plain ``nn.Linear`` head themselves, chunk by chunk, and
never call it; anything else (a LoRA-wrapped head, soft-capped or scaled logits) goes through the
model's own forward. FSDP2 needs the same answer to decide what its head unit must gather in
backward, hence one definition here.
"""

from __future__ import annotations

from torch import nn

# Config keys of heads that post-process their logits: those take the model's own forward.
_POST_PROCESSED = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def is_fsdp_unit(module: nn.Module) -> bool:
    """Whether FSDP2 sharded ``module`` as a unit of its own (its class then derives from FSDPModule)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def plain_head(model: nn.Module) -> bool:
    """Whether the losses apply ``model``'s head themselves: a frozen, bias-free ``nn.Linear`` whose
    logits the model does not post-process."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # FSDP2 swaps a sharded module's class for one deriving from (FSDPModule, nn.Linear): still plain.
    plain = type(head) is nn.Linear or (is_fsdp_unit(head) and type(head).__bases__[-1] is nn.Linear)
    if not plain or head.weight.requires_grad or head.bias is not None:
        return False
    config = getattr(model, "config", None)
    return not any(getattr(config, key, None) for key in _POST_PROCESSED)
