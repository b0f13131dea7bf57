"""What lorakit knows about vLLM's LoRA, in one place: the ranks it accepts, what it refuses, and
the MoE expert layouts it loads (with the exact per-expert export and its inverse).

Ranks: vLLM's ``--max-lora-rank`` takes one of ``VLLM_MAX_LORA_RANKS`` and serves any adapter of
rank at most that value.

MoE: vLLM (``vllm/lora/model_manager.py``) loads MoE LoRA in one of two layouts, chosen per model
class by its ``is_3d_moe_weight`` flag:

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
served 3-D, so it is not exported). vLLM's LoRA covers no other raw parameter (a router).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import LoraConfig, is_residual_init
from .experts import conventional_order, general_name, wrapper_paths
from .io import PEFT_PREFIX, read_adapter, write_adapter

# The values vLLM's `--max-lora-rank` may take (vllm/config/lora.py, MaxLoRARanks). It is an upper
# bound: vLLM serves any adapter whose rank is at most the server's max_lora_rank (peft_helper.py,
# validate_legal), whatever the rank itself is.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")
# The fused MoE expert weights vLLM's LoRA has a form for (per expert, or PEFT's 3-D layout).
VLLM_EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
# vLLM model classes marked is_3d_moe_weight (they read PEFT's fused 3-D expert LoRA): the fallback
# when this vLLM's registry cannot be asked. Every other MoE family reads the per-expert layout.
VLLM_3D_MOE = frozenset({"GptOssForCausalLM", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM",
                         "InternS1ProForConditionalGeneration"})
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
    return write_adapter(dst, *split_per_expert(config, tensors, str(source)))


def split_per_expert(config: LoraConfig, tensors: dict[str, torch.Tensor],
                     source: str = "the adapter") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """:func:`export_per_expert` in memory: an adapter's config and PEFT-keyed tensors in vLLM's 2-D layout.

    Args:
        config: the adapter's config (with ``target_parameters``).
        tensors: its PEFT-keyed tensors, fused experts as ``(experts * r, in)`` / ``(out, r * experts)``.
        source: what the errors name (a file, or the in-memory adapter).

    Returns:
        The per-expert config and tensors (``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``:
        A (r, in), B (out, r)); other tensors are passed through.

    Raises:
        ValueError: as :func:`export_per_expert`.
    """
    tensors = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    wrappers = expert_wrappers(config, paths)
    if not wrappers:
        raise ValueError(f"{source}: no fused expert weights (target_parameters) to export per expert")
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
                out[f"{owner}.{e}.{proj}.lora_A.weight"] = per_a[e].clone()  # gate and up share A: own copies
                out[f"{owner}.{e}.{proj}.lora_B.weight"] = bs[e].clone()
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
    return exported, {PEFT_PREFIX + k: v for k, v in out.items()}


def import_per_expert(src: Union[str, Path], dst: Union[str, Path]) -> Path:
    """Inverse of :func:`export_per_expert`: vLLM's per-expert layout -> PEFT's fused ``target_parameters``.

    Expert ``e``'s ``gate_proj`` and ``up_proj`` become rows of ``gate_up_proj``'s B with their
    shared A (exact); ``down_proj`` stacks as is. Other tensors (attention, shared experts) are
    copied unchanged.

    Raises:
        ValueError: no per-expert weights; an expert lacks a projection; or an expert's gate and up
            have different A or rank (one fused ``gate_up_proj`` pair cannot hold them exactly).
    """
    config, tensors, source = read_adapter(src)
    return write_adapter(dst, *fuse_per_expert(config, tensors, str(source)))


def fuse_per_expert(config: LoraConfig, tensors: dict[str, torch.Tensor],
                    source: str = "the adapter") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """:func:`import_per_expert` in memory (the inverse of :func:`split_per_expert`): a per-expert
    adapter's config and tensors in PEFT's fused ``target_parameters`` layout, PEFT-keyed.

    Raises:
        ValueError: as :func:`import_per_expert`.
    """
    tensors = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    found: dict[str, dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = defaultdict(lambda: defaultdict(dict))
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        match = _PER_EXPERT_KEY.match(key)
        if match is None:
            out[key] = value
        elif key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            found[match["owner"]][int(match["e"])][match["proj"]] = (value, tensors[f"{path}.lora_B.weight"])
    if not found:
        raise ValueError(f"{source}: no per-expert weights (experts.<e>.gate_proj/up_proj/down_proj) to fuse")
    rank_pattern = {k: v for k, v in config.rank_pattern.items() if r"experts\.\d+\." not in k}
    alpha_pattern = {k: v for k, v in config.alpha_pattern.items() if r"experts\.\d+\." not in k}
    params_seen: set[str] = set()
    for owner, experts in found.items():
        count = max(experts) + 1
        if sorted(experts) != list(range(count)):
            raise ValueError(f"{source}: '{owner}' has LoRA for experts {sorted(experts)}, not all of 0..{count - 1}")
        fused: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for e in range(count):
            projs = experts[e]
            if "gate_proj" in projs or "up_proj" in projs:
                if set(projs) & {"gate_proj", "up_proj"} != {"gate_proj", "up_proj"}:
                    raise ValueError(f"{source}: '{owner}.{e}' has only one of gate_proj / up_proj")
                (a_gate, b_gate), (a_up, b_up) = projs["gate_proj"], projs["up_proj"]
                if a_gate.shape != a_up.shape or not torch.equal(a_gate, a_up):
                    raise ValueError(f"{source}: '{owner}.{e}.gate_proj' and '.up_proj' have different lora_A; one fused "
                                     "gate_up_proj pair per expert cannot represent them exactly")
                fused["gate_up_proj"].append((a_gate, torch.cat([b_gate, b_up])))
            if "down_proj" in projs:
                fused["down_proj"].append(projs["down_proj"])
        for param, pairs in fused.items():
            if len(pairs) != count:
                raise ValueError(f"{source}: '{owner}': {param} covers {len(pairs)} of {count} experts")
            r = pairs[0][0].shape[0]
            if any(a.shape[0] != r for a, _ in pairs):
                raise ValueError(f"{source}: '{owner}' {param}: experts have different ranks")
            proj = "gate_proj" if param == "gate_up_proj" else "down_proj"
            alpha = config.alpha_for(f"{owner}.0.{proj}")
            fused_config = dataclasses.replace(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
            if r != fused_config.rank_for(f"{owner}.{param}"):
                rank_pattern[re.escape(f"{owner}.{param}")] = r
            if alpha != fused_config.alpha_for(f"{owner}.{param}"):
                alpha_pattern[re.escape(f"{owner}.{param}")] = alpha
            fused[param] = [(torch.cat([a for a, _ in pairs]), torch.stack([b for _, b in pairs], dim=-1))]
        ordered = conventional_order(fused)
        params_seen.update(general_name(f"{owner}.{p}") for p in ordered)
        for param, path in wrapper_paths(owner, ordered).items():
            a, b = fused[param][0]
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.contiguous()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.reshape(b.shape[0], -1).contiguous()
    leaves = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in out
                     if not any(k.startswith(f"{PEFT_PREFIX}{owner}.") for owner in found)})
    fused_config = dataclasses.replace(config, target_modules=leaves or None,
                                       target_parameters=sorted(params_seen, key=lambda p: conventional_order(
                                           {q.rsplit(".", 1)[-1] for q in params_seen}).index(p.rsplit(".", 1)[-1])),
                                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return fused_config, {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in out.items()}


def vllm_problems(desc: Any) -> list[str]:
    """Reasons vLLM would refuse to serve this adapter (empty when it serves it).

    Args:
        desc: the adapter's ``describe.AdapterDescription``.
    """
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
    problems += per_expert_problems(sorted(desc.ranks))
    return problems


VLLM_MOE_VERIFIED = (
    "verified so far: the layouts above come from vLLM's loader source; vLLM's CPU build (0.32.0) cannot run an MoE "
    "model with LoRA enabled (its MoE LoRA layer needs Triton's fused-MoE kernel, which has no CPU backend); the "
    "GPU comparison (tests/test_vllm_moe.py) has not run yet"
)


def vllm_rank(desc: Any) -> int:
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


def vllm_notes(desc: Any) -> list[str]:
    """What vLLM does with this adapter's MoE experts (empty for a dense adapter)."""
    return _layout_notes(desc) + ([VLLM_MOE_VERIFIED] if _layout_notes(desc) else [])


def _layout_notes(desc: Any) -> list[str]:
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


def vllm_reads_3d_moe(vllm: Any, model_dir: str) -> bool:
    """Whether vLLM reads expert LoRA for ``model_dir``'s architecture in PEFT's fused 3-D layout.

    Asks vLLM's model registry for the class's ``is_3d_moe_weight``; where that private call is
    missing, the classes known to set it (``VLLM_3D_MOE``) decide.
    """
    try:
        architectures = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    registry = getattr(getattr(vllm, "ModelRegistry", None), "_try_load_model_cls", None)
    for arch in architectures:
        cls = None
        if callable(registry):
            try:
                cls = registry(arch)
            except Exception:  # noqa: BLE001 - a registry that cannot load the class: use the list
                cls = None
        if cls is not None:
            return bool(getattr(cls, "is_3d_moe_weight", False))
        if arch in VLLM_3D_MOE:
            return True
    return False


def vllm_adapter(config: LoraConfig, tensors: dict[str, torch.Tensor],
                 experts_3d: bool) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter (config, PEFT-keyed tensors) as vLLM reads it: fused MoE experts rewritten per
    expert (``split_per_expert``, exact) unless vLLM reads this model's experts in 3-D (``experts_3d``)."""
    if config.target_parameters and not experts_3d:
        return split_per_expert(config, tensors, "the policy adapter")
    return config, tensors
