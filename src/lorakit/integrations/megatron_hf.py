"""Megatron-core GPT layer names and fused layouts <-> Hugging Face (Llama/Qwen-style) PEFT adapters.

Pure tensor bookkeeping, no torch.distributed and no megatron import: it works on full (gathered)
LoRA weights, so the in-process export and the offline export of a checkpoint share it.

Layouts (checked against megatron-core 0.16 ``SelfAttention.get_query_key_value_tensors`` and
``MLP``):

* ``linear_qkv`` output rows are grouped per query group: for each of the ``g`` groups,
  ``[q rows of its h/g heads; k rows of its head; v rows of its head]`` (``head_dim`` rows per head).
  HF's ``q_proj`` lists heads in order, head ``i`` belonging to group ``i // (h/g)`` (``repeat_kv``).
* ``linear_fc1`` of a gated MLP (SwiGLU) stacks ``[gate; up]`` along its output (the MLP's
  ``glu`` chunks its output in two, gate first).
* ``linear_proj`` is HF's ``o_proj``, ``linear_fc2`` is ``down_proj``.
* MoE experts (``SequentialMLP``): expert ``e``'s ``local_experts.<j>.linear_fc1`` ([gate; up]) and
  ``linear_fc2`` are rows ``e`` of transformers' fused ``mlp.experts.gate_up_proj`` (experts,
  2 * intermediate, hidden) and ``mlp.experts.down_proj`` (experts, hidden, intermediate), the
  Qwen3-MoE / Qwen2-MoE / Mixtral layout. Their LoRA goes to PEFT's ``target_parameters`` layout
  (``lora.experts``): A (experts * r, in) with expert ``e``'s rows at ``e * r``, B (out, r * experts)
  with expert ``e``'s column ``j`` at ``j * experts + e``. Exact both ways (one A, B per expert on
  both sides); every expert of a layer must carry the same rank and alpha (one PEFT tensor holds them).

A LoRA on the fused ``linear_qkv`` has one A and one B; its HF form gives q/k/v the same A and
each its rows of B, which is exact. The inverse (HF -> Megatron) is exact when q, k and v (those
present) share one A, rank and alpha; a projection the HF adapter leaves out gets zero B rows.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from ..lora.config import LoraConfig
from ..lora.experts import conventional_order, wrapper_paths
from ..lora.vllm_format import expert_wrappers

ROLES = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1", "linear_fc2": "fc2"}
# role -> (HF parent module, HF projection names in Megatron's fused order)
HF_NAMES = {
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "proj": ("self_attn", ("o_proj",)),
    "fc1": ("mlp", ("gate_proj", "up_proj")),
    "fc2": ("mlp", ("down_proj",)),
}
EXPERT_PARAMS = {"expert_fc1": "gate_up_proj", "expert_fc2": "down_proj"}
PEFT_PREFIX = "base_model.model."
_GPT_PATH = re.compile(r"(^|.*\.)layers\.\d+\.(self_attention\.linear_(qkv|proj)|mlp\.linear_fc[12])$")
_EXPERT_PATH = re.compile(r"(^|.*\.)layers\.\d+\.mlp\.experts\.local_experts\.\d+\.linear_fc(?P<fc>[12])$")


@dataclass
class ModuleInfo:
    """What export/import needs to know about one wrapped Megatron layer (JSON-serialisable)."""

    key: str
    """Checkpoint key prefix of the layer: ``model<chunk>.<module path>``."""
    role: str
    """qkv | proj | fc1 | fc2 (from the leaf name), or "" for a layer with no HF counterpart."""
    layer: int
    """Global 0-based transformer layer index (Megatron's ``layer_number - 1``)."""
    parallel_mode: str
    in_features: int
    out_features: int
    partition_stride: int
    r: int
    alpha: float
    use_rslora: bool
    num_heads: int = 0
    num_query_groups: int = 0
    head_dim: int = 0
    gated: bool = False
    expert: int = -1
    """Global index of the MoE expert this layer belongs to (-1: not an expert layer)."""
    num_experts: int = 0
    """Experts of the MoE layer, all expert-parallel ranks together (0: not an expert layer)."""
    ep_rank: int = 0
    """Expert-parallel rank holding this expert layer (its checkpoint shard's folder)."""

    def to_dict(self) -> dict:
        return asdict(self)


def role_of(path: str) -> str:
    """The HF-mappable role of a Megatron GPT module path (qkv, proj, fc1, fc2, expert_fc1,
    expert_fc2), or "" (shared experts, other models)."""
    found = _EXPERT_PATH.match(path)
    if found:
        return f"expert_fc{found['fc']}"
    if not _GPT_PATH.match(path):
        return ""
    return ROLES[path.rsplit(".", 1)[-1]]


def split_qkv(t: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Split rows of a fused ``linear_qkv`` tensor (out = g * (h/g + 2) * d, ...) into q, k, v rows.

    Returns:
        ``(q (h*d, ...), k (g*d, ...), v (g*d, ...))``.
    """
    per = num_heads // num_groups
    if t.shape[0] != num_groups * (per + 2) * head_dim:
        raise ValueError(
            f"linear_qkv has {t.shape[0]} output rows; {num_heads} heads in {num_groups} groups of head_dim "
            f"{head_dim} need {num_groups * (per + 2) * head_dim}"
        )
    grouped = t.reshape(num_groups, per + 2, head_dim, *t.shape[1:])
    q = grouped[:, :per].reshape(num_heads * head_dim, *t.shape[1:])
    k = grouped[:, per].reshape(num_groups * head_dim, *t.shape[1:])
    v = grouped[:, per + 1].reshape(num_groups * head_dim, *t.shape[1:])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int,
             head_dim: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: HF q/k/v rows -> Megatron's grouped ``linear_qkv`` rows."""
    per = num_heads // num_groups
    rest = q.shape[1:]
    parts = [q.reshape(num_groups, per, head_dim, *rest), k.reshape(num_groups, 1, head_dim, *rest),
             v.reshape(num_groups, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(num_groups * (per + 2) * head_dim, *rest)


def hf_module(info: ModuleInfo, projection: str) -> str:
    """HF module path of one projection of a Megatron layer, e.g. ``model.layers.3.self_attn.q_proj``."""
    parent, _ = HF_NAMES[info.role]
    return f"model.layers.{info.layer}.{parent}.{projection}"


def _split_rows(info: ModuleInfo, b: torch.Tensor) -> list[torch.Tensor]:
    if info.role == "qkv":
        return list(split_qkv(b, info.num_heads, info.num_query_groups, info.head_dim))
    if info.role == "fc1":
        if not info.gated:
            raise ValueError(
                f"{info.key}: linear_fc1 of a non-gated MLP has no gate_proj/up_proj counterpart in "
                "Llama/Qwen-style HF models; export supports gated (SwiGLU) MLPs"
            )
        return list(b.chunk(2, dim=0))
    return [b]


def to_hf_adapter(
    modules: list[tuple[ModuleInfo, torch.Tensor, torch.Tensor]],
    config: LoraConfig,
    base_model_name_or_path: Optional[str] = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Full Megatron LoRA weights -> an HF PEFT adapter (config and ``base_model.model.``-keyed tensors).

    Args:
        modules: ``(info, A (r, in), B (out, r))`` per wrapped layer, gathered from all ranks.
        config: the Megatron-side adapter config (dropout, rsLoRA and init are carried over).
        base_model_name_or_path: written into the adapter config.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    experts = [m for m in modules if m[0].role in EXPERT_PARAMS]
    params = _experts_to_hf(experts, tensors, ranks)
    for info, a, b in modules:
        if info.role in EXPERT_PARAMS:
            continue
        if not info.role:
            raise ValueError(
                f"{info.key}: no Hugging Face counterpart for this layer (export maps the GPT decoder's "
                "linear_qkv / linear_proj / linear_fc1 / linear_fc2)"
            )
        _, names = HF_NAMES[info.role]
        for projection, rows in zip(names, _split_rows(info, b)):
            path = hf_module(info, projection)
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.contiguous().clone()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = rows.contiguous().clone()
            ranks[path] = (info.r, info.alpha)
    if not tensors:
        raise ValueError("no LoRA layers to export")
    leaves = sorted({p.rsplit(".", 1)[-1] for p in ranks if ".mlp.experts." not in p})
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {re.escape(p): v for p, v in ranks.items() if v != common}
    hf = replace(
        config, r=common[0], alpha=common[1], target_modules=leaves or None, exclude_modules=None,
        target_parameters=[f"mlp.experts.{p}" for p in params] or None,
        layers_to_transform=None, layers_pattern=None, modules_to_save=None,
        rank_pattern={k: v[0] for k, v in odd.items() if v[0] != common[0]},
        alpha_pattern={k: v[1] for k, v in odd.items() if v[1] != common[1]},
        task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path or config.base_model_name_or_path,
    )
    return hf, tensors


def experts_owner(layer: int) -> str:
    """HF path of layer ``layer``'s fused experts module."""
    return f"model.layers.{layer}.mlp.experts"


def _experts_to_hf(experts: list[tuple[ModuleInfo, torch.Tensor, torch.Tensor]], tensors: dict[str, torch.Tensor],
                   ranks: dict[str, tuple[int, float]]) -> list[str]:
    """Stack every expert's A and B into PEFT's fused tensors (into ``tensors``); returns the
    parameters (gate_up_proj, down_proj) in registration order."""
    groups: dict[tuple[int, str], dict[int, tuple[ModuleInfo, torch.Tensor, torch.Tensor]]] = {}
    for info, a, b in experts:
        if info.role == "expert_fc1" and not info.gated:
            raise ValueError(f"{info.key}: the experts' linear_fc1 is not gated (no [gate; up]); export maps gated "
                             "experts to transformers' fused gate_up_proj")
        groups.setdefault((info.layer, info.role), {})[info.expert] = (info, a, b)
    per_layer: dict[int, set[str]] = {}
    for (layer, role), by_expert in sorted(groups.items()):
        first = next(iter(by_expert.values()))[0]
        count = first.num_experts
        if sorted(by_expert) != list(range(count)):
            missing = sorted(set(range(count)) - set(by_expert))
            raise ValueError(f"layer {layer} {role}: experts {missing[:8]} have no LoRA (PEFT's fused layout holds "
                             f"all {count} experts of a layer in one tensor)")
        shapes = {(i.r, i.alpha, i.use_rslora) for i, _, _ in by_expert.values()}
        if len(shapes) != 1:
            raise ValueError(f"layer {layer} {role}: experts have different rank/alpha {sorted(shapes)}; PEFT's fused "
                             "layout gives every expert of a layer one rank and alpha")
        a = torch.cat([by_expert[e][1] for e in range(count)])  # (experts * r, in)
        b = torch.stack([by_expert[e][2] for e in range(count)], dim=-1)  # (out, r, experts)
        param = EXPERT_PARAMS[role]
        per_layer.setdefault(layer, set()).add(param)
        ranks[f"{experts_owner(layer)}.{param}"] = (first.r, first.alpha)
        tensors[f"{layer}:{param}:A"] = a.contiguous()
        tensors[f"{layer}:{param}:B"] = b.reshape(b.shape[0], -1).contiguous()
    params: set[str] = set()
    for layer, present in per_layer.items():
        ordered = conventional_order(present)
        params.update(ordered)
        for param, path in wrapper_paths(experts_owner(layer), ordered).items():
            for which in "AB":
                tensors[f"{PEFT_PREFIX}{path}.lora_{which}.weight"] = tensors.pop(f"{layer}:{param}:{which}")
    return conventional_order(params)


def expert_wrapper_keys(info: ModuleInfo, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> Optional[tuple[str, str]]:
    """The ``(lora_A key, lora_B key)`` (without the PEFT prefix) holding expert layer ``info``'s
    fused parameter in an HF adapter, or None when the adapter does not adapt it."""
    owner, param = experts_owner(info.layer), EXPERT_PARAMS[info.role]
    paths = sorted({k.split(".lora_")[0] for k in tensors if k.startswith(owner + ".")})
    for path, (found_owner, found_param) in expert_wrappers(config, paths).items():
        if found_owner == owner and found_param == param:
            return f"{path}.lora_A.weight", f"{path}.lora_B.weight"
    return None


def _expert_from_hf(info: ModuleInfo, config: LoraConfig, tensors: dict[str, torch.Tensor],
                    source: str) -> Optional[tuple[torch.Tensor, torch.Tensor, int, float]]:
    keys = expert_wrapper_keys(info, config, tensors)
    if keys is None:
        return None
    if info.role == "expert_fc1" and not info.gated:
        raise ValueError(f"{info.key}: experts without a gated linear_fc1 cannot be imported from gate_up_proj")
    param_path = f"{experts_owner(info.layer)}.{EXPERT_PARAMS[info.role]}"
    r, alpha, count = config.rank_for(param_path), config.alpha_for(param_path), info.num_experts
    a_all, b_all = tensors[keys[0]], tensors[keys[1]]
    if tuple(a_all.shape) != (count * r, info.in_features) or tuple(b_all.shape) != (info.out_features, r * count):
        raise ValueError(
            f"{source}: '{keys[0]}' / '{keys[1]}' are {tuple(a_all.shape)} / {tuple(b_all.shape)}; {info.key} "
            f"({count} experts, rank {r}) needs {(count * r, info.in_features)} / {(info.out_features, r * count)}"
        )
    a = a_all.reshape(count, r, info.in_features)[info.expert].clone()
    b = b_all.reshape(info.out_features, r, count)[:, :, info.expert].contiguous()
    return a, b, r, alpha


def from_hf_adapter(
    info: ModuleInfo, config: LoraConfig, tensors: dict[str, torch.Tensor], source: str
) -> Optional[tuple[torch.Tensor, torch.Tensor, int, float]]:
    """The full ``(A, B, r, alpha)`` of one Megatron layer from an HF adapter's tensors.

    ``tensors`` are keyed without the PEFT prefix. Returns None when the adapter has none of the
    layer's projections.

    Raises:
        ValueError: the projections of one fused layer disagree (different A, rank or alpha),
            which one fused A and B cannot represent; or a shape does not fit.
    """
    if not info.role:
        raise ValueError(f"{info.key}: no Hugging Face counterpart for this layer; cannot import it from {source}")
    if info.role in EXPERT_PARAMS:
        return _expert_from_hf(info, config, tensors, source)
    _, names = HF_NAMES[info.role]
    found = {}
    for projection in names:
        path = hf_module(info, projection)
        a, b = tensors.get(f"{path}.lora_A.weight"), tensors.get(f"{path}.lora_B.weight")
        if (a is None) != (b is None):
            raise ValueError(f"{source}: '{path}' has only one of lora_A / lora_B")
        if a is not None:
            found[projection] = (path, a, b, config.rank_for(path), config.alpha_for(path))
    if not found:
        return None
    first_path, a, _, r, alpha = next(iter(found.values()))
    for path, other_a, _, other_r, other_alpha in found.values():
        if (other_r, other_alpha) != (r, alpha) or other_a.shape != a.shape or not torch.equal(other_a, a):
            raise ValueError(
                f"{source}: '{path}' and '{first_path}' have different lora_A, rank or alpha; Megatron's fused "
                f"{info.key.rsplit('.', 1)[-1]} has one A for all of {', '.join(names)}, so this adapter cannot be "
                "represented exactly"
            )
    if info.role == "fc1" and not info.gated:
        raise ValueError(f"{info.key}: linear_fc1 of a non-gated MLP cannot be imported from gate_proj/up_proj")
    if info.role == "qkv":
        sizes = {"q_proj": info.num_heads * info.head_dim, "k_proj": info.num_query_groups * info.head_dim,
                 "v_proj": info.num_query_groups * info.head_dim}
    elif info.role == "fc1":
        sizes = {"gate_proj": info.out_features // 2, "up_proj": info.out_features // 2}
    else:
        sizes = {names[0]: info.out_features}
    rows = []
    for projection in names:
        if projection in found:
            b = found[projection][2]
            if tuple(b.shape) != (sizes[projection], r):
                raise ValueError(
                    f"{source}: '{found[projection][0]}.lora_B.weight' is {tuple(b.shape)}, the Megatron layer "
                    f"{info.key} needs {(sizes[projection], r)}"
                )
            rows.append(b)
        else:
            rows.append(a.new_zeros(sizes[projection], r))
    b_full = fuse_qkv(*rows, info.num_heads, info.num_query_groups, info.head_dim) if info.role == "qkv" else torch.cat(rows)
    if tuple(a.shape) != (r, info.in_features):
        raise ValueError(f"{source}: '{first_path}.lora_A.weight' is {tuple(a.shape)}, {info.key} needs {(r, info.in_features)}")
    return a, b_full, r, alpha
