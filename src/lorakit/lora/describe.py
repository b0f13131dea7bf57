"""Describe an adapter directory without a model: what `lorakit inspect` prints."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from safetensors import safe_open

from .config import CONFIG_NAME, LoraConfig, is_residual_init, read_json_object, split_variants
from .io import PEFT_PREFIX, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, _load_pickle

# The values vLLM's `--max-lora-rank` may take (vllm/config/lora.py, MaxLoRARanks). It is an upper
# bound: vLLM serves any adapter whose rank is at most the server's max_lora_rank (peft_helper.py,
# validate_legal), whatever the rank itself is.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")
_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


@dataclass
class AdapterDescription:
    """What an adapter directory holds."""

    path: Path
    config: LoraConfig
    ranks: dict[str, int] = field(default_factory=dict)
    """Rank of each wrapped module, read from the shapes of its A matrix."""
    other_keys: list[str] = field(default_factory=list)
    """Keys that are not LoRA A/B (modules_to_save copies, embedding base weights)."""
    num_params: int = 0
    file_bytes: int = 0
    raw_config: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)
    """Set keys of LoRA variants lorakit does not implement (e.g. ``use_dora``)."""
    experts: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Parameter wrappers (``target_parameters``): path -> (parameter path, number of experts);
    their entry in ``ranks`` is the rank of each expert."""


def describe_adapter(path: Union[str, Path]) -> AdapterDescription:
    """Read config and tensor shapes of an adapter directory (weights are not loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not an adapter directory")
    raw = read_json_object(path / CONFIG_NAME)
    # Describe adapters lorakit cannot load too (DoRA...): the variant is reported, not refused.
    supported, variants = split_variants(raw)
    config = LoraConfig.from_dict(supported, source=str(path / CONFIG_NAME), residual_ok=True)
    shapes: dict[str, tuple[int, ...]] = {}
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own error types for a corrupt file
            raise ValueError(f"{weights}: cannot read safetensors ({err})") from None
    elif (path / PICKLE_WEIGHTS_NAME).is_file():
        weights = path / PICKLE_WEIGHTS_NAME
        shapes = {k: tuple(v.shape) for k, v in _load_pickle(weights).items()}
    else:
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
    desc = AdapterDescription(path, config, file_bytes=weights.stat().st_size, raw_config=raw, variants=variants)
    for key, shape in shapes.items():
        count = 1
        for dim in shape:
            count *= dim
        desc.num_params += count
        bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        found = _LORA_KEY.match(bare)
        if found is None:
            desc.other_keys.append(bare)
        elif found["kind"] in ("lora_A", "lora_embedding_A"):
            desc.ranks[found["path"]] = shape[0]
    from .vllm_layout import expert_wrappers  # io-level helpers; describe stays importable alone

    for path, (owner, param) in expert_wrappers(config, sorted(desc.ranks)).items():
        r = config.rank_for(f"{owner}.{param}")
        desc.experts[path] = (f"{owner}.{param}", desc.ranks[path] // r)
        desc.ranks[path] = r
    return desc


def variant_name(config: LoraConfig) -> str:
    """A short name of the LoRA variant a config describes, e.g. ``"DoRA + rsLoRA"``."""
    parts = ["DoRA" if config.use_dora else "LoRA"]
    if config.use_rslora:
        parts.append("rsLoRA")
    if is_residual_init(config.init_lora_weights):
        parts.append(f"{config.init_lora_weights} init, NOT converted: needs the residual base it was trained on")
    return " + ".join(parts)


def vllm_problems(desc: AdapterDescription) -> list[str]:
    """Reasons vLLM would refuse to serve this adapter (empty when it serves it)."""
    problems = []
    raw = desc.raw_config
    if desc.config.modules_to_save:
        problems.append(f"modules_to_save={desc.config.modules_to_save}: vLLM serves LoRA A/B weights only")
    if desc.config.use_dora:
        problems.append("use_dora=true: vLLM does not serve DoRA unmerged (merge it into the base: lorakit merge)")
    if is_residual_init(desc.config.init_lora_weights):
        problems.append(f"init_lora_weights={desc.config.init_lora_weights!r} (not converted): it only fits the residual "
                        "base it was trained on; save it converted to plain LoRA (save_adapter's default) or merge it")
    if raw.get("bias", "none") != "none" or desc.variants.get("lora_bias"):
        problems.append("trained biases (bias/lora_bias): vLLM does not serve LoRA biases")
    rank = vllm_rank(desc)
    if vllm_max_lora_rank(rank) is None:
        problems.append(f"rank {rank} exceeds {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM accepts")
    fused = {param.rsplit(".", 1)[-1] for param, n in desc.experts.values() if n > 1}
    routers = sorted({p for p, n in desc.experts.values() if n == 1})
    if routers:
        problems.append(f"LoRA on router/2-D parameters ({', '.join(routers[:3])}): vLLM serves no router adapter")
    if fused and ("down_proj" not in fused or not fused & {"gate_up_proj", "up_proj"}):
        problems.append(f"expert LoRA on {sorted(fused)} only: vLLM loads MoE adapters with both the gate/up and "
                        "the down projection of the experts")
    from .vllm_layout import per_expert_problems

    problems += per_expert_problems(sorted(desc.ranks))
    return problems


VLLM_MOE_VERIFIED = (
    "verified so far: the layouts above come from vLLM's loader source; vLLM's CPU build (0.32.0) cannot run an MoE "
    "model with LoRA enabled (its MoE LoRA layer needs Triton's fused-MoE kernel, which has no CPU backend); the "
    "GPU comparison (tests/test_vllm_moe.py) has not run yet"
)


def vllm_rank(desc: AdapterDescription) -> int:
    """The rank vLLM compares with its ``--max-lora-rank``: the largest of the config's ``r``, its
    ``rank_pattern`` values (what vLLM reads) and the ranks of the saved tensors."""
    return max([desc.config.r, *desc.config.rank_pattern.values(), *desc.ranks.values()])


def served_rank(config: LoraConfig) -> int:
    """The rank of the adapter a server or vLLM receives from a run with this (training) config:
    the largest of ``r`` and the ``rank_pattern`` values, doubled for PiSSA/OLoRA, which are handed
    over converted to plain LoRA of rank 2r for the untouched base (``final_adapter``)."""
    rank = max([config.r, *config.rank_pattern.values()])
    return 2 * rank if is_residual_init(config.init_lora_weights) else rank


def vllm_max_lora_rank(rank: int) -> Optional[int]:
    """The smallest ``--max-lora-rank`` that lets vLLM serve a rank-``rank`` adapter (None: none does)."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), None)


def vllm_notes(desc: AdapterDescription) -> list[str]:
    """What vLLM does with this adapter's MoE experts (empty for a dense adapter)."""
    return _layout_notes(desc) + ([VLLM_MOE_VERIFIED] if _layout_notes(desc) else [])


def _layout_notes(desc: AdapterDescription) -> list[str]:
    if desc.experts:
        return [
            "experts are in PEFT's 3-D layout (experts.base_layer = gate_up_proj, experts = down_proj): vLLM reads "
            "it for models it marks is_3d_moe_weight (gpt-oss, Qwen3.5-MoE, ...), or for any MoE model when served "
            "with --enable-mixed-moe-lora-format and requests declare is_3d_lora_weight",
            "for Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek and the other per-expert families, write vLLM's per-expert "
            "layout (experts.<e>.gate_proj/up_proj/down_proj, same logits): lorakit export-adapter ADAPTER OUT --format vllm",
        ]
    if any(_PER_EXPERT.search(p) for p in desc.ranks):
        return ["experts are in vLLM's per-expert layout (experts.<e>.gate_proj/up_proj/down_proj): the default "
                "MoE LoRA path of vLLM; for 3-D models (gpt-oss, Qwen3.5-MoE) serve with --enable-mixed-moe-lora-format"]
    return []
