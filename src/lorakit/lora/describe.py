"""Describe an adapter directory without a model: what `lorakit inspect` prints."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from safetensors import safe_open

from .config import CONFIG_NAME, LoraConfig, is_residual_init, read_json_object, split_variants
from .io import PEFT_PREFIX, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, _load_pickle
from .vllm_format import expert_wrappers

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
