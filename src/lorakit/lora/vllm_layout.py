"""MoE adapters for vLLM: which expert layout it loads, and the per-expert export.

vLLM (``vllm/lora/model_manager.py``) loads MoE LoRA in one of two layouts, chosen per model class
by its ``is_3d_moe_weight`` flag:

- 3-D, PEFT's ``target_parameters`` layout (what lorakit and PEFT save): ``experts.base_layer.lora_A``
  / ``lora_B`` hold ``gate_up_proj``, ``experts.lora_A`` / ``lora_B`` hold ``down_proj``, each
  ``(experts * r, in)`` / ``(out, r * experts)``. Read for the models vLLM marks 3-D (gpt-oss,
  Qwen3.5-MoE, ...), or for any MoE model when the server runs with
  ``--enable-mixed-moe-lora-format`` and the request declares ``is_3d_lora_weight``.
- 2-D, per expert: ``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj`` ``.lora_A.weight`` (r, in)
  and ``.lora_B.weight`` (out, r), for every expert and all three projections. The default for the
  other MoE families (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek, ...).

``export_per_expert`` rewrites the first into the second exactly: ``gate_up_proj``'s expert-``e``
pair (A_e, B_e) becomes ``gate_proj`` (A_e, B_e[:I]) and ``up_proj`` (A_e, B_e[I:]), which adds the
same update to each half (transformers concatenates [gate; up]; gpt-oss interleaves them and is
served 3-D, so it is not exported).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path
from typing import Union

import torch

from .config import LoraConfig
from .experts import conventional_order, wrapper_paths
from .io import PEFT_PREFIX, read_adapter, write_adapter

_PER_EXPERT_KEY = re.compile(r"^(?P<owner>.+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.lora_[AB]\.weight$")


def expert_wrappers(config: LoraConfig, paths: list[str]) -> dict[str, tuple[str, str]]:
    """For an adapter's module paths, the parameter-wrapper ones: ``{wrapper path: (owner path, parameter)}``.

    Without a model the nesting order is taken from transformers' convention (gate/up before down),
    which is the order every fused-experts class registers its weights in.
    """
    if not config.target_parameters:
        return {}
    owners: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        owner = path
        while owner.endswith(".base_layer"):
            owner = owner[: -len(".base_layer")]
        for target in config.target_parameters:
            module_part, _, param = target.rpartition(".")
            if not module_part or owner == module_part or owner.endswith("." + module_part):
                owners[owner].add(param)
    found: dict[str, tuple[str, str]] = {}
    for owner, params in owners.items():
        present = [p for p in paths if p == owner or p.startswith(owner + ".base_layer")]
        ordered = conventional_order(params)
        if len(ordered) != len(present):
            continue  # the file does not hold one wrapper per targeted parameter here
        for param, path in wrapper_paths(owner, ordered).items():
            found[path] = (owner, param)
    return found


def per_expert_problems(paths: list[str]) -> list[str]:
    """Experts of a per-expert (2-D) adapter that lack one of gate/up/down (vLLM packs all three)."""
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in paths:
        found = _PER_EXPERT_KEY.match(path + ".lora_A.weight")
        if found:
            seen[(found["owner"], found["e"])].add(found["proj"])
    problems = []
    for (owner, e), projs in sorted(seen.items()):
        missing = {"gate_proj", "up_proj", "down_proj"} - projs
        if missing and not projs <= {"up_proj", "down_proj"}:
            problems.append(f"{owner}.{e} lacks {sorted(missing)}: vLLM needs all three projections of every expert")
    return problems[:5]


def export_per_expert(src: Union[str, Path], dst: Union[str, Path]) -> Path:
    """Write adapter ``src`` to ``dst`` with fused expert weights split per expert (vLLM's 2-D layout).

    Every other tensor is copied unchanged; the config lists ``gate_proj``/``up_proj``/``down_proj`` in
    ``target_modules`` instead of ``target_parameters``. Logits are unchanged (the split is exact).

    Raises:
        ValueError: the adapter has no fused expert weights, or a parameter other than
            gate_up_proj/up_proj/down_proj (a router) that has no per-expert form.
    """
    config, tensors, source = read_adapter(src)
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    wrappers = expert_wrappers(config, paths)
    if not wrappers:
        raise ValueError(f"{src}: no fused expert weights (target_parameters) to export per expert")
    out: dict[str, torch.Tensor] = {}
    names = set(config.target_modules or []) if isinstance(config.target_modules, list) else set()
    ranks: dict[str, dict[str, int]] = defaultdict(dict)
    alphas: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in tensors.items():
        path = key.rsplit(".lora_", 1)[0]
        if path not in wrappers:
            out[key] = value
            continue
        owner, param = wrappers[path]
        if not key.endswith(".lora_A.weight"):
            continue
        a, b = value, tensors[f"{path}.lora_B.weight"]
        r = config.rank_for(f"{owner}.{param}")
        experts = a.shape[0] // r
        if experts * r != a.shape[0] or b.shape[1] != a.shape[0]:
            raise ValueError(f"{source}: '{path}' holds {tuple(a.shape)} / {tuple(b.shape)}, not (experts * {r}, in) / (out, {r} * experts)")
        per_a = a.view(experts, r, a.shape[1])
        per_b = b.view(b.shape[0], r, experts).permute(2, 0, 1)
        if param == "gate_up_proj":
            half = per_b.shape[1] // 2
            parts = {"gate_proj": per_b[:, :half], "up_proj": per_b[:, half:]}
        elif param in ("up_proj", "down_proj"):
            parts = {param: per_b}
        else:
            raise ValueError(f"{source}: '{owner}.{param}' has no per-expert form in vLLM (only expert gate/up/down do)")
        for proj, bs in parts.items():
            names.add(proj)
            ranks[proj][owner] = r
            alphas[proj][owner] = config.alpha_for(f"{owner}.{param}")
            for e in range(experts):
                out[f"{PEFT_PREFIX}{owner}.{e}.{proj}.lora_A.weight"] = per_a[e].clone()  # gate and up share A: own copies
                out[f"{PEFT_PREFIX}{owner}.{e}.{proj}.lora_B.weight"] = bs[e].clone()
    rank_pattern = dict(config.rank_pattern)
    alpha_pattern = dict(config.alpha_pattern)
    for proj in ranks:
        for table, values, default in ((rank_pattern, ranks[proj], config.r), (alpha_pattern, alphas[proj], config.alpha)):
            if set(values.values()) == {default}:
                continue
            if len(set(values.values())) == 1:
                table[rf"experts\.\d+\.{proj}"] = next(iter(values.values()))
            else:
                for owner, value in values.items():
                    table[rf"{re.escape(owner)}\.\d+\.{proj}"] = value
    exported = dataclasses.replace(config, target_modules=sorted(names), target_parameters=None,
                                   rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return write_adapter(dst, exported, {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in out.items()})
