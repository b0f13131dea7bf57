"""The experts' computation with LoRA, as grouped GEMMs, through transformers' experts interface.

transformers (5.x) decorates each fused-experts class with ``@use_experts_implementation``: the
module's forward looks up ``config._experts_implementation`` in its ``ExpertsInterface`` and runs
that function with the module's flags (``has_gate``, ``has_bias``, ``is_transposed``,
``has_post_expert_norm``, ``_is_expert_parallel``) and hooks (``_apply_gate``, ``act_fn``,
``post_expert_norm``). The LoRA has to sit between the up and the down projection, so it cannot
be added around that function; it is added *inside* the same computation instead:

- ``grouped_mm`` (transformers' default) and ``eager``: token/expert pairs sorted by expert, one
  grouped GEMM per projection for the base weight (the same ``grouped_mm`` kernel the base runs)
  and two per adapter, ``x @ A_e^T`` then ``@ B_e^T``, with the per-expert offsets kept on the
  device, so the host is never synchronised;
- ``batched_mm``: per pair, the expert's weights and factors gathered and multiplied by ``bmm``
  (transformers' choice for small batches, e.g. decoding).

Any other implementation (``deepgemm``, ``sonicmoe``, one registered by the user or a hub kernel)
computes the experts from the weights alone and would skip the LoRA: it is refused, by name.

Tensor names: ``S`` = tokens * top_k pairs, ``E`` experts, ``r`` rank.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer import RowRoutes, expand_routes

# Implementations whose math is known here: the name in transformers' interface -> how LoRA joins it.
# "eager" is transformers' loop over experts with a host sync; the grouped form computes the same.
GROUPED = ("grouped_mm", "eager")
BATCHED = ("batched_mm",)
SUPPORTED_IMPLEMENTATIONS = GROUPED + BATCHED

# What the computation reads from an experts module (transformers' ``use_experts_implementation``).
INTERFACE_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")


def interface_problem(owner: nn.Module) -> Optional[str]:
    """Why ``owner`` cannot be computed here, or None: a missing flag or hook of the experts interface.

    Checked when an adapter is attached (and on every forward), so a transformers release that
    renames one of them fails loudly instead of falling back to a slower path.
    """
    missing = [f for f in INTERFACE_FLAGS if not hasattr(owner, f)]
    if not missing:
        if owner.has_gate:
            missing += [n for n in ("_apply_gate", "gate_up_proj") if not hasattr(owner, n)]
        else:
            missing += [n for n in ("act_fn", "up_proj") if not hasattr(owner, n)]
        missing += [n for n in ("down_proj",) if not hasattr(owner, n)]
        if owner.has_post_expert_norm and not hasattr(owner, "post_expert_norm"):
            missing.append("post_expert_norm")
    if missing:
        return (f"{type(owner).__name__} lacks {', '.join(missing)} of transformers' experts interface "
                "(@use_experts_implementation), which expert LoRA computes through")
    return None


def implementation(owner: nn.Module) -> str:
    """The experts implementation the model selected (``config._experts_implementation``).

    A module used on its own (no config) is computed as ``grouped_mm``, transformers' default.
    """
    config = getattr(owner, "config", None)
    name = getattr(config, "_experts_implementation", None) if config is not None else None
    return "grouped_mm" if name is None else name


def check_implementation(owner: nn.Module, where: str) -> str:
    """The selected implementation, or a ``RuntimeError`` naming it when it would skip the LoRA."""
    name = implementation(owner)
    if name not in SUPPORTED_IMPLEMENTATIONS:
        raise RuntimeError(
            f"{where}: experts_implementation '{name}' computes the experts in its own kernel from the base "
            f"weights and would skip the LoRA on them; use one of {', '.join(SUPPORTED_IMPLEMENTATIONS)} "
            "(model.set_experts_implementation('grouped_mm')) or merge the adapter first"
        )
    return name


# --- grouped matrix multiply ---------------------------------------------------------------------
def _aligned(t: torch.Tensor) -> bool:
    # torch's grouped_mm kernels need 16-byte aligned data and strides (except the unit stride).
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def _kernel() -> Optional[Callable[..., torch.Tensor]]:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM kernel takes ``x (S, in) @ w (E, in, out)`` (else the fallback runs)."""
    if _kernel() is None or x.dtype != w.dtype or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling() and w.dtype != torch.bfloat16:
        return False  # inductor lowers grouped_mm for bf16 only (transformers' rule as well)
    if w.device.type == "cuda" and torch.cuda.get_device_capability(w.device) < (8, 0):
        return False
    return _aligned(x) and _aligned(w) and (w.shape[-1] * w.element_size()) % 16 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x (S, in)`` rows sorted by group times ``w (E, in, out)``: ``(S, out)``.

    Rows ``offs[e-1]:offs[e]`` use ``w[e]``; rows past ``offs[-1]`` are left undefined (masked by the
    caller). Where the kernel does not apply (float64, unaligned shapes), the groups run one ``mm``
    each after one host sync, as transformers' own fallback does.
    """
    if grouped_mm_applies(x, w):
        return _kernel()(x, w, offs=offs)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    pieces, start = [], 0
    for e, end in enumerate(offs.tolist()):  # fallback only: the one host sync
        if end > start:
            pieces.append(x[start:end] @ w[e])
        start = end
    if not pieces:
        return out
    return torch.cat(pieces + [out[start:]])


def _pad_rank(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # grouped_mm writes (S, r) rows whose stride must be a multiple of 16 bytes; zero rows of A and
    # zero columns of B contribute exactly nothing, so padding the rank changes no value.
    unit = 16 // a.element_size()
    pad = -a.shape[-1] % unit
    if pad == 0:
        return a, b
    return F.pad(a, (0, pad)), F.pad(b, (0, 0, 0, pad))


def grouped_factors(wrapper: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``name``'s factors as grouped-GEMM weights: ``A^T (E, in, r)``, ``B^T (E, r, out)``.

    ``A^T`` is a view of the stored ``lora_A``; ``B^T`` is one copy of the (small) ``lora_B``,
    whose stored layout puts the experts innermost.
    """
    a, b = wrapper.factors(name)
    return _pad_rank(a.transpose(1, 2), b.transpose(1, 2).contiguous())


# --- the experts' forward ------------------------------------------------------------------------
def experts_forward(
    owner: nn.Module,
    wrappers: dict[str, nn.Module],
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    routes: Optional[RowRoutes],
    where: str,
) -> torch.Tensor:
    """The experts' output with LoRA on the targeted weights, as the selected implementation computes it.

    Args:
        owner: the model's experts module (transformers' experts interface).
        wrappers: parameter name -> its LoRA wrapper (``gate_up_proj``/``up_proj``, ``down_proj``).
        hidden: (tokens, hidden) input rows.
        top_k_index: (tokens, k) expert ids chosen by the router.
        top_k_weights: (tokens, k) their routing weights.
        routes: per-row adapters (each adapter's rank-r intermediate is masked to its rows), or None.
        where: the module's path, for errors.

    Returns:
        (tokens, hidden) in ``hidden``'s dtype.
    """
    problem = interface_problem(owner)
    if problem:
        raise RuntimeError(f"{where}: {problem}")
    name = check_implementation(owner, where)
    slots, names = _token_slots(routes, hidden.shape[0], hidden.device)
    live = {
        p: [(n, w) for n in (w._live if routes is None else [n for n in names if n in w.r])]
        for p, w in wrappers.items()
    }
    run = _batched if name in BATCHED else _grouped
    return run(owner, live, hidden, top_k_index, top_k_weights, slots, names)


_Live = dict[str, list[tuple[str, nn.Module]]]


def _grouped(owner: nn.Module, live: _Live, hidden: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor, slots: Optional[torch.Tensor], names: list[str]) -> torch.Tensor:
    # transformers' grouped_mm_experts_forward, step for step, with the adapters added to each projection.
    experts = owner.num_experts
    tokens, k = top_k_index.shape
    ids, perm = torch.sort(top_k_index.reshape(-1))  # (S,) sorted expert ids
    token_of = perm // k
    x = hidden[token_of]  # (S, hidden)
    pair_weight = top_k_weights.reshape(-1)[perm]
    # histc, not bincount: no host sync, and CUDA-graph safe (transformers' choice); float on CPU.
    counts = torch.histc(ids.float() if ids.device.type in ("cpu", "mps") else ids.int(),
                         bins=experts, min=0, max=experts - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # (E,) end of each expert's rows
    pair_slots = slots[token_of] if slots is not None else None
    sentinel = None
    if owner._is_expert_parallel:
        # Expert-parallel sentinels (ids >= E) sort last, past offs[-1]: zero them before and after.
        sentinel = (ids >= experts).unsqueeze(-1)
        ids = ids.clamp(max=experts - 1)
        x = x.masked_fill(sentinel, 0.0)

    def project(param: str, inp: torch.Tensor) -> torch.Tensor:
        weight = getattr(owner, param)
        w = weight if owner.is_transposed else weight.transpose(-2, -1)  # (E, in, out)
        y = grouped_mm(inp.to(weight.dtype), w, offs)
        if owner.has_bias:
            y = y + getattr(owner, f"{param}_bias")[ids]
        for name, wrapper in live.get(param, ()):
            a_t, b_t = grouped_factors(wrapper, name)
            h = grouped_mm(wrapper.lora_dropout[name](inp).to(a_t.dtype), a_t, offs) * wrapper.scaling[name]
            if pair_slots is not None:
                h = h * (pair_slots == names.index(name) + 1).unsqueeze(-1).to(h.dtype)
            y = y + grouped_mm(h, b_t, offs).to(y.dtype)
        if sentinel is not None:
            y = y.masked_fill(sentinel, 0.0)
        return y

    h = project("gate_up_proj", x) if owner.has_gate else project("up_proj", x)
    h = owner._apply_gate(h) if owner.has_gate else owner.act_fn(h)
    y = project("down_proj", h)
    if owner.has_post_expert_norm:
        y = owner.post_expert_norm(y)
    y = y * pair_weight.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=perm.device)
    return y[inv].view(tokens, k, -1).sum(dim=1).to(hidden.dtype)


def _batched(owner: nn.Module, live: _Live, hidden: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor, slots: Optional[torch.Tensor], names: list[str]) -> torch.Tensor:
    # transformers' batched_mm_experts_forward with the adapters' factors gathered per pair as well.
    experts = owner.num_experts
    tokens, k = top_k_index.shape
    x = hidden.repeat_interleave(k, dim=0)  # (S, hidden)
    ids = top_k_index.reshape(-1)
    pair_weight = top_k_weights.reshape(-1)
    pair_slots = slots.repeat_interleave(k, dim=0) if slots is not None else None
    if owner._is_expert_parallel:
        pair_weight = pair_weight.masked_fill(ids >= experts, 0.0)
        ids = ids.clamp(0, experts - 1)

    def project(param: str, inp: torch.Tensor) -> torch.Tensor:
        weight = getattr(owner, param)[ids]  # (S, out, in), or (S, in, out) transposed
        xw = inp.to(weight.dtype)
        if owner.is_transposed:
            y = torch.bmm(xw.unsqueeze(1), weight).squeeze(1)
        else:
            y = torch.bmm(weight, xw.unsqueeze(-1)).squeeze(-1)
        if owner.has_bias:
            y = y + getattr(owner, f"{param}_bias")[ids]
        for name, wrapper in live.get(param, ()):
            a, b = wrapper.factors(name)  # (E, r, in), (E, out, r)
            xin = wrapper.lora_dropout[name](inp).to(a.dtype)
            h = torch.bmm(a[ids], xin.unsqueeze(-1)) * wrapper.scaling[name]  # (S, r, 1)
            if pair_slots is not None:
                h = h * (pair_slots == names.index(name) + 1).view(-1, 1, 1).to(h.dtype)
            y = y + torch.bmm(b[ids], h).squeeze(-1).to(y.dtype)
        return y

    h = project("gate_up_proj", x) if owner.has_gate else project("up_proj", x)
    h = owner._apply_gate(h) if owner.has_gate else owner.act_fn(h)
    y = project("down_proj", h)
    if owner.has_post_expert_norm:
        y = owner.post_expert_norm(y)
    y = y * pair_weight.unsqueeze(-1)
    return y.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)


def _token_slots(routes: Optional[RowRoutes], tokens: int,
                 device: torch.device) -> tuple[Optional[torch.Tensor], list[str]]:
    """Per token, 1 + the index of its row's adapter in ``names`` (0: the base), or None unrouted."""
    if routes is None:
        return None, []
    names: list[str] = [n for n, _ in routes if n is not None]
    per_token = torch.zeros(tokens, dtype=torch.long, device=device)
    for name, rows in expand_routes(routes, tokens):
        if name is not None:
            per_token[rows.to(device)] = names.index(name) + 1
    return per_token, names
