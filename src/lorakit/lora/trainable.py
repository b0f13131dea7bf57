"""Which parameters train (the base never does; adapters by choice), and the trainable-parameter report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

from torch import nn

from .config import LoraConfig
from .tree import adapter_configs, lora_modules, unwrap_model

def _adapter_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    owned: dict[str, list[nn.Parameter]] = {}
    for _, module in lora_modules(model):
        for name in module.adapter_names:
            owned.setdefault(name, []).extend(module.adapter_parameters(name))
    return owned


def set_adapter_trainable(model: nn.Module, adapter_name: str, trainable: bool) -> None:
    """Freeze the base and set one adapter's ``requires_grad``; other adapters are left alone.

    This is the rule ``inject_lora`` and ``load_adapter`` apply, so adding a frozen adapter (a
    reference policy, a second adapter for inference) never stops another from training, and
    the order adapters are added in does not matter:

    * every parameter no adapter owns (the base, ``original_module`` of trained-in-full
      modules) gets ``requires_grad=False``: lorakit never trains base weights;
    * ``adapter_name``'s parameters (LoRA A/B, its ``modules_to_save`` copies) get ``trainable``;
    * every other adapter's parameters keep the value they had.

    Use :func:`mark_trainable` to choose the whole set of trained adapters at once.
    """
    model = unwrap_model(model)
    owned = _adapter_params(model)
    ids = {id(p) for params in owned.values() for p in params}
    for p in model.parameters():
        if id(p) not in ids:
            p.requires_grad_(False)
    for p in owned.get(adapter_name, []):
        p.requires_grad_(trainable)


def mark_trainable(model: nn.Module, adapter_names_: Union[str, Sequence[str], None]) -> None:
    """Make exactly ``adapter_names_`` trainable: every other parameter, base or adapter, is frozen.

    Args:
        model: a model with LoRA layers.
        adapter_names_: one adapter, several, or None (freeze everything).
    """
    model = unwrap_model(model)
    names = [] if adapter_names_ is None else [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_)
    owned = _adapter_params(model)
    unknown = [n for n in names if n not in owned]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {list(owned)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        for p in owned[name]:
            p.requires_grad_(True)


@dataclass
class TrainableReport:
    """Parameter counts of a LoRA model, printable in the seed's log style."""

    total: int
    trainable: int
    wrapped_modules: int
    adapters: dict[str, LoraConfig]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = ["LoRA configuration:"]
        for name, cfg in self.adapters.items():
            targets = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules or [])
            lines.append(
                f"  - Adapter '{name}': r={cfg.r}, alpha={cfg.alpha:g}, dropout={cfg.dropout:g}, "
                f"rslora={cfg.use_rslora}, targets=[{targets}]"
            )
            if cfg.target_parameters:
                lines.append(f"  - Adapter '{name}' expert/parameter targets (one A, B per expert): "
                             + ", ".join(cfg.target_parameters))
        lines += [
            f"  - Wrapped modules: {self.wrapped_modules}",
            f"  - Total parameters: {self.total:,}",
            f"  - Trainable parameters: {self.trainable:,}",
            f"  - Trainable %: {self.percent:.4f}%",
        ]
        return "\n".join(lines)


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count total and trainable parameters and the wrapped modules of ``model``."""
    model = unwrap_model(model)
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    wrapped = sum(1 for _ in lora_modules(model))
    return TrainableReport(total, trainable, wrapped, dict(adapter_configs(model)))
