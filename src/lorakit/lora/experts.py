"""LoRA on weights held as bare parameters: fused Mixture-of-Experts experts (and routers).

transformers (5.x) keeps each MoE layer's experts as stacked 3-D parameters on one module
(``mlp.experts.gate_up_proj``: (experts, 2 * intermediate, hidden), ``mlp.experts.down_proj``:
(experts, hidden, intermediate); gpt-oss stores them transposed, (experts, in, out), with biases).
There is no ``nn.Linear`` to wrap, so PEFT names them with ``target_parameters`` and so does lorakit.

Layout (PEFT's, native here, so saved keys need no conversion): one wrapper per targeted
parameter; a second parameter on the same module wraps the first wrapper, so the module's
parameters (in the order the module registered them) sit at ``experts.base_layer``, ``experts``
(``experts.base_layer.lora_A`` is ``gate_up_proj``'s, ``experts.lora_A`` is ``down_proj``'s).
Each expert ``e`` has its own rank-``r`` pair, stored stacked as two ``nn.Linear``:

- ``lora_A``: (experts * r, in), row ``e * r + j`` is row ``j`` of expert ``e``'s A;
- ``lora_B``: (out, r * experts), column ``j * experts + e`` is column ``j`` of expert ``e``'s B.

Computation goes through transformers' experts interface (``experts_grouped``): the LoRA joins
the model's own grouped GEMMs (``grouped_mm``, ``batched_mm``), each token meets only the adapters
of the experts it was routed to, no (experts, out, in) update is materialised and the host is not
synchronised. Fused experts without that interface, or under an implementation that would skip
the LoRA (a fused kernel), are refused with the reason. 2-D parameters such as a router's weight
take a generic path that calls the module with ``W + scale * B @ A`` (PEFT's method; cheap there).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .experts_grouped import check_implementation, experts_forward, interface_problem
from .layer import LoraLayer, init_lora_pair

# Parameter names of fused expert weights the routed path computes (transformers' experts interface).
_ROUTED_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
# Conventional registration order, used to name PEFT's nesting when no model is at hand.
_CONVENTIONAL_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "w1", "w3", "down_proj", "w2")


# --- finding fused experts ---------------------------------------------------------------------
def fused_expert_params(module: nn.Module) -> list[str]:
    """Names of the stacked 3-D expert weights held directly by ``module`` (registration order).

    A module is a fused-experts module when it has 3-D parameters whose first dimension is its
    ``num_experts`` (transformers' ``*Experts`` classes); biases (2-D) are not LoRA targets.
    """
    if isinstance(module, LoraLayer):
        return []
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int):
        return []
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == count]


def general_name(path: str) -> str:
    """``model.layers.3.mlp.experts.down_proj`` -> ``mlp.experts.down_proj`` (what configs name)."""
    return re.sub(r"^.*?\.\d+\.", "", path)


def auto_target_parameters(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """What ``all-linear`` adds for MoE models: every fused expert weight, named as PEFT configs do."""
    names: dict[str, None] = {}
    for path, module in modules:
        if path.endswith(".base_layer"):
            continue
        for param in fused_expert_params(_owner(module)):
            names[general_name(f"{path}.{param}")] = None
    return sorted(names)


def router_linear_ids(modules: Iterable[tuple[str, nn.Module]]) -> set[int]:
    """``nn.Linear`` routers and gates of MoE blocks, which ``all-linear`` leaves out.

    A Linear that sits next to a fused-experts module and outputs one logit per expert (the router)
    or a single value (a shared-expert gate, e.g. Qwen2-MoE's ``shared_expert_gate``) is a gate:
    vLLM serves no LoRA on it. Name it in ``target_modules`` to train it anyway.
    """
    found: set[int] = set()
    for _, module in modules:
        children = dict(module.named_children())
        experts = [c for c in children.values() if fused_expert_params(_owner(c))]
        if not experts:
            continue
        count = _owner(experts[0]).num_experts
        for child in children.values():
            base = getattr(child, "base_layer", child)
            if isinstance(base, nn.Linear) and base.out_features in (count, 1):
                found.add(id(base))
    return found


def match_parameters(
    modules: Iterable[tuple[str, nn.Module]], targets: Sequence[str]
) -> list[tuple[str, nn.Module, list[str]]]:
    """Owner modules with the parameters ``targets`` names (PEFT's rule: the full
    ``<module path>.<parameter>`` or a dotted tail of it), in model order.

    Returns:
        ``(owner path, owner module or its outermost wrapper, [parameter names in registration order])``.
    """
    out = []
    for path, module in modules:
        if path.endswith(".base_layer"):
            continue  # an inner wrapper: its owner is reached through the outermost one
        if isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
            continue  # a LoRA Linear's own weight is not a parameter target
        owner = _owner(module)
        names = [
            name for name, _ in owner.named_parameters(recurse=False)
            if any(f"{path}.{name}" == t or f"{path}.{name}".endswith("." + t) for t in targets)
        ]
        if names:
            out.append((path, module, names))
    return out


def wrapper_paths(owner_path: str, params: Sequence[str]) -> dict[str, str]:
    """PEFT's nesting: parameter -> path of its wrapper (the last-registered one is outermost)."""
    n = len(params)
    return {p: owner_path + ".base_layer" * (n - 1 - i) for i, p in enumerate(params)}


def conventional_order(params: Iterable[str]) -> list[str]:
    """Parameters in the order transformers registers them (gate/up before down)."""
    rank = {name: i for i, name in enumerate(_CONVENTIONAL_ORDER)}
    return sorted(params, key=lambda p: (rank.get(p, len(rank)), p))


def lora_shapes(owner: nn.Module, param: str, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of ``lora_A`` and ``lora_B`` for a rank-``r`` adapter on ``owner.<param>``."""
    experts, fan_in, fan_out, _ = param_dims(owner, param)
    return (experts * r, fan_in), (fan_out, r * experts)


def param_dims(owner: nn.Module, param: str) -> tuple[int, int, int, bool]:
    """``(experts, in_features, out_features, stored transposed)`` of a targeted parameter.

    Raises:
        ValueError: the parameter is neither a stacked 3-D expert weight nor a 2-D weight matrix.
    """
    weight = getattr(owner, param)
    kind = type(owner).__name__
    if weight.dim() == 3:
        transposed = bool(getattr(owner, "is_transposed", False))
        experts, d1, d2 = weight.shape
        return (experts, d1, d2, True) if transposed else (experts, d2, d1, False)
    if weight.dim() == 2 and not fused_expert_params(owner):
        return 1, weight.shape[1], weight.shape[0], False
    raise ValueError(
        f"target_parameters: '{param}' of {kind} has shape {tuple(weight.shape)}; LoRA targets stacked 3-D "
        "expert weights and 2-D weight matrices (e.g. a router's weight), not biases"
    )


def _check_fused(owner: nn.Module, param: str, path: str) -> None:
    """Refuse fused expert weights that the grouped computation cannot reach (a clear error, not a
    slower fallback): a module without transformers' experts interface, a parameter it does not
    compute, or an experts implementation that would skip the LoRA."""
    problem = interface_problem(owner)
    if problem is None and param not in _ROUTED_PARAMS:
        problem = f"'{param}' is not one of the expert weights it computes ({', '.join(_ROUTED_PARAMS)})"
    if problem:
        raise ValueError(f"target_parameters '{path}': {problem}")
    try:
        check_implementation(owner, f"target_parameters '{path}'")
    except RuntimeError as err:
        raise ValueError(str(err)) from None


def _owner(module: nn.Module) -> nn.Module:
    while isinstance(module, LoraParameter):
        module = module.base_layer
    return module


# --- the wrapper ---------------------------------------------------------------------------------
class LoraParameter(LoraLayer):
    """LoRA on one parameter of ``base_layer``'s innermost module (PEFT's ``ParamWrapper`` layout).

    For a fused expert weight, expert ``e`` gets ``W_e + scale * B_e @ A_e`` with
    A_e: (r, in), B_e: (out, r); for a 2-D weight (a router), one pair as in ``LoraLinear``.
    Only the outermost wrapper of a module runs: it reads every nested wrapper's adapters.
    """

    def __init__(self, base_layer: nn.Module, param_name: str, param_path: Optional[str] = None) -> None:
        super().__init__(base_layer)
        self.param_name = param_name
        self.param_path = param_path or param_name
        """Path of the targeted parameter in the model (what rank_pattern/alpha_pattern match)."""
        self.num_experts, self.in_features, self.out_features, self.transposed = param_dims(_owner(base_layer), param_name)
        if self.num_experts > 1:
            _check_fused(_owner(base_layer), param_name, self.param_path)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def owner(self) -> nn.Module:
        """The model's own module that holds the parameter."""
        return _owner(self.base_layer)

    def _base_weight(self) -> torch.Tensor:
        return getattr(self.owner, self.param_name)

    def _stores(self) -> list[Any]:
        return [self.lora_A, self.lora_B]

    def set_dropout(self, name: str, p: float) -> None:
        if p > 0 and self.num_experts == 1:
            raise ValueError(
                f"target_parameters '{self.param_path}': lora_dropout must be 0 on a 2-D parameter "
                "(its update is folded into the weight, so there is no LoRA input to drop)"
            )
        super().set_dropout(name, p)

    def _create_weights(self, name: str, r: int, factory: dict[str, Any]) -> None:
        e = self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, r * e, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r * e, self.out_features, bias=False, **factory)

    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        init_lora_pair(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert views ``(A: (experts, r, in), B: (experts, out, r))`` of adapter ``name`` (no copy)."""
        e, r = self.num_experts, self.r[name]
        a = self.lora_A[name].weight.view(e, r, self.in_features)
        b = self.lora_B[name].weight.view(self.out_features, r, e).permute(2, 0, 1)
        return a, b

    def _delta_live(self, name: str) -> torch.Tensor:
        """The update in the parameter's layout, differentiable, in the adapter's dtype."""
        a, b = self.factors(name)
        delta = torch.bmm(b, a) * self.scaling[name]  # (experts, out, in)
        if self.transposed:
            delta = delta.transpose(1, 2)
        return delta if self._base_weight().dim() == 3 else delta[0]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        delta = torch.bmm(b.detach().float(), a.detach().float()) * self.scaling[name]
        if self.transposed:
            delta = delta.transpose(1, 2)
        return delta if self._base_weight().dim() == 3 else delta[0]

    def extra_repr(self) -> str:
        return f"param={self.param_name}, experts={self.num_experts}, " + super().extra_repr()

    # --- forward ---------------------------------------------------------------------------
    def _chain(self) -> list["LoraParameter"]:
        chain = [self]
        while isinstance(chain[-1].base_layer, LoraParameter):
            chain.append(chain[-1].base_layer)
        return chain

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        chain = self._chain()
        owner = chain[-1].base_layer
        routes = self.row_routes
        if self.disabled and any(w.merged_adapters for w in chain):
            return _without_merged(owner, chain, args, kwargs)
        if self.disabled or (routes is None and not any(w._live for w in chain)):
            return owner(*args, **kwargs)
        if routes is not None:
            merged = [n for w in chain for n, _ in routes if n in w.merged_adapters]
            if merged:
                raise RuntimeError(f"adapter '{merged[0]}' is merged; per-row routing needs unmerged adapters")
        if self.num_experts > 1:
            hidden, index, weights = _bind_expert_args(owner, args, kwargs)
            wrappers = {w.param_name: w for w in chain}
            return experts_forward(owner, wrappers, hidden, index, weights, routes, self.param_path.rsplit(".", 1)[0])
        if routes is not None:
            raise RuntimeError(
                f"per-row adapter routing is not supported on parameter targets of {type(owner).__name__} "
                f"({', '.join(w.param_name for w in chain)}); use one adapter per batch"
            )
        weights = {w.param_name: w._base_weight() for w in chain}
        for w in chain:
            for name in w._live:
                weights[w.param_name] = weights[w.param_name] + w._delta_live(name).to(weights[w.param_name].dtype)
        return torch.func.functional_call(owner, weights, args, kwargs, strict=False)


def _without_merged(owner: nn.Module, chain: Sequence[LoraParameter], args: tuple, kwargs: dict) -> Any:
    # disable_adapters on merged experts: run the owner on ``W - delta`` (fp32, rounded once to the
    # weight's dtype) instead of unmerging, so no weight is ever rewritten (as LoraLayer does).
    weights = {}
    for w in chain:
        base = w._base_weight()
        if w.merged_adapters:
            exact = base.float()
            for name in w.merged_adapters:
                exact = exact - w.delta_weight(name).to(exact.device)
            weights[w.param_name] = exact.to(base.dtype)
    return torch.func.functional_call(owner, weights, args, kwargs, strict=False)


_ARG_NAMES: dict[type, list[str]] = {}


def _bind_expert_args(owner: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden (tokens, hidden), top-k expert ids (tokens, k), top-k weights (tokens, k))``."""
    cls = type(owner)
    if cls not in _ARG_NAMES:
        params = list(inspect.signature(cls.forward).parameters)[1:4]
        _ARG_NAMES[cls] = params
    names = _ARG_NAMES[cls]
    values = list(args[:3]) + [kwargs[n] for n in names[len(args):3] if n in kwargs]
    if len(values) != 3 or any(v is None for v in values):
        raise RuntimeError(f"{cls.__name__} was called without (hidden_states, expert indices, expert weights)")
    return values[0], values[1], values[2]
