"""LoRA layers: a frozen base layer plus any number of named low-rank adapters.

Module and parameter names follow PEFT (``base_layer``, ``lora_A``, ``lora_B``,
``lora_embedding_A``, ``lora_embedding_B``, ``original_module``, ``modules_to_save``), so a state
dict of a lorakit model reads like a PEFT one.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import dora, residual
from .config import is_residual_init

# Per-row routing: one (adapter name or None for the base, row indices) pair per group of rows.
RowRoutes = Sequence[tuple[Optional[str], torch.Tensor]]
# A run of consecutive rows on one adapter: (adapter name or None, start, stop).
Span = tuple[Optional[str], int, int]


class Routes(tuple):
    """``RowRoutes`` (iterates as ``(name, rows)`` pairs) that also know, when every adapter's rows
    form one block of consecutive rows, those blocks in row order (``spans``; None otherwise).

    With spans a LoRA layer splits its input into views and runs each adapter's plain GEMMs on its
    block: nothing is gathered or scattered per row, and autograd's backward of the split is one
    concatenation. The spans are worked out once on the host when the routes are built, so the
    layers never read row indices back from the device.
    """

    spans: Optional[tuple[Span, ...]]

    def __new__(cls, pairs: Sequence[tuple[Optional[str], torch.Tensor]],
                spans: Optional[Sequence[Span]] = None) -> "Routes":
        routes = super().__new__(cls, pairs)
        routes.spans = tuple(spans) if spans is not None else None
        return routes


def make_routes(row_adapters: Sequence[Optional[str]], device: torch.device) -> Routes:
    """The routes of a batch whose row ``i`` uses adapter ``row_adapters[i]`` (None: the base)."""
    groups: dict[Optional[str], list[int]] = {}
    spans: list[Span] = []
    for row, name in enumerate(row_adapters):
        groups.setdefault(name, []).append(row)
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], row + 1)
        else:
            spans.append((name, row, row + 1))
    contiguous = len(spans) == len(groups)  # no adapter's rows come back after another's
    pairs = [(name, torch.tensor(rows, dtype=torch.long, device=device)) for name, rows in groups.items()]
    return Routes(pairs, spans if contiguous else None)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 ``Conv1D`` (a Linear whose weight is stored (in, out)).

    Detected by shape of the class rather than imported, so the core needs no transformers.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight (in, out))."""
    if isinstance(module, nn.Linear):  # a quantized (bitsandbytes) Linear stores packed codes: ask the layer
        return module.in_features, module.out_features
    rows, cols = module.weight.shape
    return (rows, cols) if is_conv1d(module) else (cols, rows)


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name.startswith("_"):
        raise ValueError(f"invalid adapter name {name!r}: use a non-empty name without '.' that does not start with '_'")


class LoraLayer(nn.Module):
    """Bookkeeping shared by the LoRA wrappers: ranks, scales, which adapters run, which are merged.

    Subclasses hold the adapter weights and implement ``_delta`` (the scaled LoRA output for an
    input) and ``delta_weight`` (the same update as a weight matrix, for merging).

    ``generation`` counts the changes that replace tensors or rewrite the base: adding, deleting,
    re-initialising or loading an adapter, changing a scale, writing the base weight (merge,
    unmerge), assigning a new ``base_layer``, moving or casting the layer (``.to``). Caches built from the weights (the stacked weights of
    a mixed-adapter batch, DoRA's norms) are keyed on it, never on ``data_ptr``: a freed tensor's
    block is reused by the next one of the same size, and a gathered FSDP2 weight moves every step.
    In-place edits of the same adapter tensors (an optimizer step) show in their ``_version``;
    whoever replaces or rewrites weights behind lorakit's back calls ``weights_changed()``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.generation = 0
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_routes: Optional[RowRoutes] = None
        # Adapters the forward pass adds: active, present here, not merged. Kept in sync by _refresh.
        self._live: tuple[str, ...] = ()
        self.train(base_layer.training)  # a wrapper put into an eval model stays in eval mode

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of the layer it built (q_proj.weight, embed.num_embeddings):
        # answer from the base layer so wrapping stays invisible to it.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "base_layer":  # a new base module (dequantized, swapped): nothing cached from the old one holds
            self.weights_changed()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to(device / dtype), .half(), .cuda() replace every tensor: nothing cached from the old ones holds.
        out = super()._apply(fn, recurse)
        self.weights_changed()
        return out

    def weights_changed(self) -> None:
        """Invalidate every cache built from this layer's weights (bumps ``generation``)."""
        self.__dict__["generation"] = self.__dict__.get("generation", 0) + 1

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _set_scale(self, name: str, r: int, alpha: float, use_rslora: bool) -> None:
        self.weights_changed()
        self.r[name] = r
        self.lora_alpha[name] = float(alpha)
        self.use_rslora[name] = use_rslora
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def set_dropout(self, name: str, p: float) -> None:
        # A new module starts in training mode; follow the layer's mode so inference stays deterministic.
        self.lora_dropout[name] = (nn.Dropout(p) if p > 0 else nn.Identity()).train(self.training)

    def set_scale(self, name: str, alpha: float, use_rslora: bool) -> None:
        """Change an adapter's alpha (and rsLoRA choice) keeping its rank."""
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter '{name}' is merged; unmerge before changing its scale")
        self._set_scale(name, self.r[name], alpha, use_rslora)

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: bool | str = True,
        dtype: Optional[torch.dtype] = None,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``name`` of rank ``r``, initialised so that the layer's output is unchanged
        (unless ``init`` is False). Weights live on the base weight's device (meta stays meta).
        ``use_dora`` adds DoRA's magnitude vector (see ``lora.dora``)."""
        check_adapter_name(name)
        if name in self.r:
            raise ValueError(f"adapter '{name}' already exists on this layer")
        if use_dora and not isinstance(self, (LoraLinear, LoraEmbedding)):
            raise ValueError(f"use_dora: implemented for Linear, GPT-2 Conv1D and Embedding layers, "
                             f"not {type(self.base_layer).__name__}")
        if is_residual_init(init) and not isinstance(self, LoraLinear):
            raise ValueError(f"init_lora_weights={init!r}: implemented for Linear and GPT-2 Conv1D layers, "
                             f"not {type(self.base_layer).__name__}")
        self.use_dora[name] = use_dora
        self._set_scale(name, r, alpha, use_rslora)
        self.set_dropout(name, dropout)
        weight = self._base_weight()
        self._create_weights(name, r, {"device": weight.device, "dtype": dtype or weight.dtype})
        self.weights_changed()
        if weight.device.type != "meta":
            self.reset_adapter(name, init)

    def _create_weights(self, name: str, r: int, factory: dict[str, Any]) -> None:
        raise NotImplementedError

    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        raise NotImplementedError

    def reads_base(self, name: str, init: bool | str = True) -> bool:
        """Whether initialising adapter ``name`` reads the base weight (DoRA's magnitude, PiSSA/OLoRA).

        ``reset_adapter`` is ``reset_without_base`` then ``init_from_base``, so a sharded load can
        run the first while the base is still on meta and the second once each base weight can be
        gathered, one module at a time.
        """
        return False

    def reset_without_base(self, name: str, init: bool | str = True) -> None:
        """The part of ``reset_adapter`` that does not read the base weight (its random draws)."""
        self.reset_adapter(name, init)

    def init_from_base(self, name: str, init: bool | str = True) -> None:
        """The part of ``reset_adapter`` that reads the base weight (none here)."""

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = list(names)
        self._refresh()

    def _refresh(self) -> None:
        self._live = tuple(n for n in self.active_adapters if n in self.r and n not in self.merged_adapters)

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter '{name}' is merged; unmerge before deleting it")
        for store in self._stores():
            if name in store:
                del store[name]
        del self.lora_dropout[name]
        for table in (self.r, self.lora_alpha, self.use_rslora, self.scaling, self.use_dora):
            table.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self.weights_changed()
        self._refresh()

    def _stores(self) -> list[Any]:
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for store in self._stores() if name in store for p in _params_of(store[name])]

    # --- merge -------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's update in the layout of the base weight, scaled, in float32."""
        raise NotImplementedError

    def merge_weight(self, value: torch.Tensor, name: str, sign: float = 1.0) -> torch.Tensor:
        """``value`` (fp32, base layout) with adapter ``name`` merged in (sign +1) or taken out (-1)."""
        return value + sign * self.delta_weight(name)

    def write_base_weight(self, value: torch.Tensor) -> None:
        """Overwrite the base weight (cast to its dtype); ``merged_adapters`` says what it holds."""
        weight = self._base_weight()
        with torch.no_grad():
            weight.copy_(value.to(weight.dtype))
        self.weights_changed()
        self._refresh()

    # --- forward -----------------------------------------------------------------------------
    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        return result + self._delta(x, name).to(result.dtype)

    def _merged_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """What merged adapter ``name`` adds to the output: no dropout (the merged weight has
        none) and no gradient to its A and B (the merged weight is frozen)."""
        raise NotImplementedError

    def _without_merged(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Disabled with adapters merged: take their updates out of the output, never out of the
        # weights, so a merged model is bit for bit the same after any number of disable blocks.
        # ``result - delta`` runs in the adapters' (float32) dtype and rounds once.
        # Merged adapters come out newest first, the inverse of the order they went in.
        for name in reversed(self.merged_adapters):
            if self.use_dora.get(name):  # the merge scaled the weight: divide, then subtract
                result = dora.unmerged_output(self, result, x, name).to(result.dtype)
            else:
                result = (result - self._merged_delta(x, name)).to(result.dtype)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return self._without_merged(result, x) if self.merged_adapters else result
        if self.row_routes is not None:
            return self._routed(x, result)
        base = result
        for name in self._live:
            if self.use_dora.get(name):
                result = result + dora.dora_delta(self, x, base, name).to(result.dtype)
            else:
                result = self._add_delta(result, x, name)
        return result

    def _routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        n = sum(len(rows) for _, rows in self.row_routes)
        lead = result.shape[:-1]  # (B, T): rows, or with one route per token, (B * T) tokens
        if x.shape[0] != n and len(lead) > 1 and lead.numel() == n:  # one adapter per token (multi-job rows)
            flat_x = x.reshape(lead.numel(), *x.shape[len(lead):])
            flat = self._routed_rows(flat_x, result.reshape(lead.numel(), result.shape[-1]), self.row_routes)
            return flat.reshape(result.shape)
        if n == 0 or x.shape[0] % n:
            raise RuntimeError(f"route_adapters was given {n} row adapters but the batch has {x.shape[0]} rows "
                               f"({lead.numel()} tokens)")
        # One adapter per row; MoE blocks flatten (B, T) into B * T tokens before their experts.
        return self._routed_rows(x, result, expand_routes(self.row_routes, x.shape[0]))

    def _routed_rows(self, x: torch.Tensor, result: torch.Tensor, routes: RowRoutes) -> torch.Tensor:
        groups = [(name, rows) for name, rows in routes if name is not None and name in self.r]
        merged = [name for name, _ in groups if name in self.merged_adapters]
        if merged:
            raise RuntimeError(f"adapter '{merged[0]}' is merged; per-row routing needs unmerged adapters")
        if len(groups) == 1 and len(groups[0][1]) == x.shape[0]:
            # The whole batch uses one adapter: the plain LoRA pass, no row gathers.
            name = groups[0][0]
            if self.use_dora.get(name):
                return result + dora.dora_delta(self, x, result, name).to(result.dtype)
            return self._add_delta(result, x, name)
        gather = routes is self.row_routes and self._can_gather()
        if len(groups) > 1 and not torch.is_grad_enabled() and not self.training and gather:
            return self._routed_gathered(x, result)
        if not groups:  # no row uses an adapter of this layer
            return result
        spans = getattr(routes, "spans", None)
        if spans is not None:
            return self._routed_spans(x, result, spans)
        # One LoRA pass per adapter over the rows that chose it: cost grows with the number of
        # distinct adapters in the batch, not with the number of rows.
        for name, rows in groups:
            rows = rows.to(x.device)
            if self.use_dora.get(name):  # these rows of result still hold the base output
                delta = dora.dora_delta(self, x.index_select(0, rows), result.index_select(0, rows), name)
            else:
                delta = self._delta(x.index_select(0, rows), name)
            result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    def _routed_spans(self, x: torch.Tensor, result: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
        """Each adapter's LoRA pass on its own block of consecutive rows.

        Args:
            x: (rows, ..., in) the layer's input.
            result: (rows, ..., out) the base layer's output for ``x``.
            spans: ``(name, start, stop)`` blocks covering ``[0, rows)`` in order.

        Returns:
            (rows, ..., out): ``result`` plus, on each block, that block's adapter's update.
        """
        sizes = [stop - start for _, start, stop in spans]
        # split gives views; its backward is one concatenation (index_select's would zero-fill
        # and scatter a whole-batch gradient per adapter).
        parts = []
        for (name, _, _), xi, ri in zip(spans, x.split(sizes), result.split(sizes)):
            if name is None or name not in self.r:  # the base, or an adapter that skips this layer
                parts.append(ri)
            elif self.use_dora.get(name):
                parts.append(ri + dora.dora_delta(self, xi, ri, name).to(ri.dtype))
            else:
                parts.append(self._add_delta(ri, xi, name))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _can_gather(self) -> bool:
        return False

    def _routed_gathered(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]} scale={self.scaling[n]:g}" for n in self.r)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` or transformers' GPT-2 ``Conv1D``.

    ``y = base(x) + B(A(dropout(x))) * scale`` with A: (r, in_features), B: (out_features, r).
    For Conv1D (``fan_in_fan_out``) the base weight is (in, out), so the merged update is transposed.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only (PEFT's name)

    def _stores(self) -> list[Any]:
        return [self.lora_A, self.lora_B, self.lora_magnitude_vector]

    def _create_weights(self, name: str, r: int, factory: dict[str, Any]) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        if self.use_dora.get(name):
            self.lora_magnitude_vector[name] = nn.Parameter(torch.empty(self.out_features, **factory))

    def merge_weight(self, value: torch.Tensor, name: str, sign: float = 1.0) -> torch.Tensor:
        if self.use_dora.get(name):
            return dora.merge_weight(self, value, name, sign)
        return super().merge_weight(value, name, sign)

    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        self.reset_without_base(name, init)
        self.init_from_base(name, init)

    def reads_base(self, name: str, init: bool | str = True) -> bool:
        return bool(self.use_dora.get(name)) or is_residual_init(init)

    def reset_without_base(self, name: str, init: bool | str = True) -> None:
        if not is_residual_init(init):
            self._reset_lora(name, init)
        self.weights_changed()

    def init_from_base(self, name: str, init: bool | str = True) -> None:
        if is_residual_init(init):  # PiSSA / OLoRA: A and B from the base weight, which becomes the residual
            residual.init_residual(self, name, init)
            self.weights_changed()
        if self.use_dora.get(name):
            dora.init_magnitude(self, name)

    def _reset_lora(self, name: str, init: bool | str) -> None:
        init_lora_pair(self.lora_A[name].weight, self.lora_B[name].weight, self.r[name], init)

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.detach().float()
        b = self.lora_B[name].weight.detach().float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _merged_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        return F.linear(F.linear(x.to(a.dtype), a) * self.scaling[name], b)

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight
        h = F.linear(self.lora_dropout[name](x).to(a.dtype), a)
        # Scaling the (..., r) intermediate is cheaper than scaling the (..., out) result.
        return F.linear(h * self.scaling[name], self.lora_B[name].weight)

    def _can_gather(self) -> bool:
        return not any(self.use_dora.values())

    def _stacked(self) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
        """All adapters' A and scaled B stacked (slot 0 = zeros: the base), rebuilt when a weight changes
        (``generation``: tensors replaced or reloaded; ``_version``: the same tensors edited in place)."""
        names = tuple(self.r)
        weights = [(self.lora_A[n].weight, self.lora_B[n].weight) for n in names]
        key = (self.generation, names, tuple((a._version, b._version) for a, b in weights),
               tuple(self.scaling[n] for n in names))
        cached = self.__dict__.get("_stack")
        if cached is None or cached[0] != key:
            r_max = max(self.r.values())
            a0, b0 = weights[0]
            a_all = a0.new_zeros(len(names) + 1, r_max, self.in_features)
            b_all = b0.new_zeros(len(names) + 1, self.out_features, r_max)
            with torch.no_grad():
                for slot, (n, (a, b)) in enumerate(zip(names, weights), start=1):
                    a_all[slot, : self.r[n]] = a
                    b_all[slot, :, : self.r[n]] = b * self.scaling[n]  # ranks padded with zeros
            cached = (key, names, a_all, b_all)
            self.__dict__["_stack"] = cached
        return cached[1], cached[2], cached[3]

    def _routed_gathered(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # Inference with several adapters in the batch: the A and scaled B of the adapters present
        # sit side by side in one (k * r, in) and one (out, k * r) matrix, and a row mask keeps each
        # row's own r columns, so the LoRA update is two plain GEMMs and a multiply, whatever the
        # mix; nothing is gathered per row or per step (rebuilt when the routes or weights change).
        names, a_all, b_all = self._stacked()
        routes = self.row_routes
        cached = self.__dict__.get("_mix")
        if cached is None or cached[0] is not routes or cached[1] is not a_all:
            rows = sum(len(r) for _, r in routes)
            present = [names.index(name) + 1 for name, _ in routes if name in names]
            r = a_all.shape[1]
            a_cat = a_all[present].reshape(len(present) * r, self.in_features)
            b_cat = b_all[present].permute(1, 0, 2).reshape(self.out_features, len(present) * r)
            mask = a_all.new_zeros(rows, len(present) * r)
            for j, (name, members) in enumerate((n, m) for n, m in routes if n in names):
                mask[members.to(mask.device), j * r:(j + 1) * r] = 1
            cached = (routes, a_all, a_cat, b_cat, mask)
            self.__dict__["_mix"] = cached
        a_cat, b_cat, mask = cached[2], cached[3], cached[4]
        h = F.linear(x.to(a_cat.dtype), a_cat)  # (rows, ..., k * r)
        h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        return result + F.linear(h, b_cat).to(result.dtype)

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        b = self.lora_B[name].weight
        if result.dtype != b.dtype or torch.is_autocast_enabled(result.device.type):
            return super()._add_delta(result, x, name)
        a = self.lora_A[name].weight
        h = F.linear(self.lora_dropout[name](x).to(a.dtype), a) * self.scaling[name]
        # addmm fuses "+ result" into the B GEMM: no separate (tokens, out) temporaries.
        out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), b.t())
        return out.view(result.shape)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``y = base(ids) + (A^T[ids] @ B^T) * scale``.

    A: (r, num_embeddings), B: (embedding_dim, r). As in PEFT, A starts at zero and B gaussian,
    so a fresh adapter changes nothing. A DoRA adapter adds a magnitude of shape (embedding_dim,)
    (see ``lora.dora``).
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only (PEFT's name)

    def _stores(self) -> list[Any]:
        return [self.lora_embedding_A, self.lora_embedding_B, self.lora_magnitude_vector]

    def _create_weights(self, name: str, r: int, factory: dict[str, Any]) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, num, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r, **factory))
        if self.use_dora.get(name):
            self.lora_magnitude_vector[name] = nn.Parameter(torch.empty(dim, **factory))

    def merge_weight(self, value: torch.Tensor, name: str, sign: float = 1.0) -> torch.Tensor:
        if self.use_dora.get(name):
            return dora.merge_weight(self, value, name, sign)
        return super().merge_weight(value, name, sign)

    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        self.reset_without_base(name, init)
        self.init_from_base(name, init)

    def reads_base(self, name: str, init: bool | str = True) -> bool:
        return bool(self.use_dora.get(name))

    def init_from_base(self, name: str, init: bool | str = True) -> None:
        if self.use_dora.get(name):
            dora.init_magnitude(self, name)

    def reset_without_base(self, name: str, init: bool | str = True) -> None:
        with torch.no_grad():
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            if init is False:
                nn.init.normal_(a)
                nn.init.normal_(b)
            elif init == "gaussian":
                nn.init.zeros_(a)
                nn.init.normal_(b, std=1.0 / self.r[name])
            else:
                nn.init.zeros_(a)
                nn.init.normal_(b)
        self.weights_changed()

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_embedding_A[name].detach().float()
        b = self.lora_embedding_B[name].detach().float()
        return (b @ a).T * self.scaling[name]

    def _merged_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._delta(x, name, detach=True)

    def _delta(self, x: torch.Tensor, name: str, detach: bool = False) -> torch.Tensor:
        # Dropout on integer ids is meaningless; PEFT skips it for embeddings too.
        base = self.base_layer
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if detach:
            a, b = a.detach(), b.detach()
        after_a = F.embedding(
            x, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )
        return (after_a @ b.T) * self.scaling[name]


class ModulesToSave(nn.Module):
    """A module trained in full: the frozen original plus one trainable copy per adapter."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_routes: Optional[RowRoutes] = None
        self.train(original_module.training)

    def __getattr__(self, name: str) -> Any:
        # Model code reading `lm_head.weight` must see the weights the forward pass uses.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str) -> None:
        check_adapter_name(name)
        if name in self.modules_to_save:
            raise ValueError(f"adapter '{name}' already has a trainable copy of this module")
        self.modules_to_save[name] = copy.deepcopy(self.original_module).train(self.training)

    def check_active(self, names: Sequence[str]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(
                f"adapters {present} each train their own copy of this module; only one of them can be active"
            )

    def set_active(self, names: Sequence[str]) -> None:
        self.check_active(names)
        self.active_adapters = list(names)

    def delete(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    def active_module(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.row_routes is None or self.disabled:
            return self.active_module()(x, *args, **kwargs)
        check_rows(self.row_routes, x)
        spans = getattr(self.row_routes, "spans", None)
        if spans is not None:  # each adapter's rows are one block: run each copy on its view
            sizes = [stop - start for _, start, stop in spans]
            parts = [(self.modules_to_save[name] if name in self.modules_to_save else self.original_module)(
                xi, *args, **kwargs) for (name, _, _), xi in zip(spans, x.split(sizes))]
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        result = self.original_module(x, *args, **kwargs)
        for name, rows in self.row_routes:
            if name is None or name not in self.modules_to_save:
                continue
            rows = rows.to(x.device)
            part = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
            result = result.index_copy(0, rows, part.to(result.dtype))
        return result


def expand_routes(routes: RowRoutes, n: int) -> RowRoutes:
    """``routes`` for a first dimension of ``n``: the batch rows, or their tokens flattened.

    MoE blocks call their experts (and shared experts) on ``hidden.view(-1, hidden_size)``:
    token ``t`` then belongs to row ``t // (n // rows)``.
    """
    rows = sum(len(r) for _, r in routes)
    if n == rows:
        return routes
    if rows == 0 or n % rows:
        raise RuntimeError(f"route_adapters was given {rows} row adapters but the batch has {n} rows")
    per = n // rows
    span = torch.arange(per)
    pairs = [(name, (r.unsqueeze(-1) * per + span.to(r.device)).reshape(-1)) for name, r in routes]
    spans = getattr(routes, "spans", None)
    return Routes(pairs, None if spans is None else [(name, a * per, b * per) for name, a, b in spans])


def init_lora_pair(a: torch.Tensor, b: torch.Tensor, r: int, init: bool | str) -> None:
    """Initialise A (r·k, in) and B (out, r·k) in place: kaiming A and zero B (True), N(0, 1/r) A and
    zero B ('gaussian'), or both kaiming (False: a non-zero adapter, for tests). Kaiming's fan-in is
    ``in``, as for each of k stacked experts alone."""
    with torch.no_grad():
        if init is False:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)


def check_rows(routes: RowRoutes, x: torch.Tensor, tokens: Optional[int] = None) -> bool:
    """Whether ``routes`` name one adapter per token (``tokens`` of them) rather than per row of ``x``.

    Raises:
        RuntimeError: the routes fit neither the rows nor (where allowed) the tokens.
    """
    expected = sum(len(rows) for _, rows in routes)
    if x.shape[0] == expected:
        return False
    if tokens is not None and tokens == expected:
        return True
    raise RuntimeError(f"route_adapters was given {expected} row adapters but the batch has {x.shape[0]} rows"
                       + (f" ({tokens} tokens)" if tokens is not None else ""))


def _params_of(entry: Any) -> list[nn.Parameter]:
    return [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
