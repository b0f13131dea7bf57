"""State-dict weights under the names (and split) the model's checkpoint files use.

transformers (5.x) loads some families with a conversion: Qwen3-MoE's per-expert
``mlp.experts.<e>.gate_proj.weight`` / ``up_proj`` / ``down_proj`` become the fused 3-D
``mlp.experts.gate_up_proj`` / ``down_proj``, Mixtral's ``block_sparse_moe.experts.<e>.w1/w3/w2``
likewise (and ``block_sparse_moe`` is renamed ``mlp``). An inference server that loads weights in checkpoint
format (vLLM's ``load_weights``) knows only the checkpoint's names, so weights taken from the
transformers model are turned back with transformers' own reverse conversion (what its
``save_pretrained`` writes), one weight at a time.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


def checkpoint_weights(model: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` (keyed like ``model``'s state dict) renamed and split as ``model``'s checkpoint stores them.

    Lazy and one weight at a time: a fused expert weight (experts, 2 * I, H) is yielded as its
    per-expert checkpoint tensors (views of it), and nothing is kept once the next weight is asked for.

    Args:
        model: the transformers model the names belong to (LoRA-wrapped is fine: only its class
            and config are read). Not a transformers model: names pass through unchanged.
        weights: ``(state-dict name, tensor)`` pairs, e.g. ``lorakit.lora.iter_merged_weights``.

    Raises:
        ValueError: a weight has no checkpoint form by itself (a conversion that fuses several
            checkpoint tensors into it needs weights this stream does not hold), naming it.
    """
    from ..lora import unwrap_model

    model = unwrap_model(model)
    revert = None
    if hasattr(model, "config") and hasattr(model, "base_model_prefix"):
        try:
            from transformers.core_model_loading import revert_weight_conversion as revert
        except ImportError:  # transformers 4.x: checkpoint names are the state dict's
            revert = None
    for name, value in weights:
        if revert is None:
            yield name, value
            del value
            continue
        try:
            converted = revert(model, {name: value})
        except Exception as err:  # noqa: BLE001 - transformers' converters raise assorted errors
            raise ValueError(f"'{name}': transformers' conversion back to {type(model).__name__}'s checkpoint "
                             f"names failed for this weight alone ({type(err).__name__}: {err})") from None
        del value
        if not converted:
            raise ValueError(f"'{name}' has no checkpoint name of its own in {type(model).__name__}")
        for item in converted.items():
            yield item
        del converted, item  # neither this layer nor its views outlive the consumer's use of them
