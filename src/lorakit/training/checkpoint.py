"""Training checkpoints: adapter (PEFT layout), optimizer, RNG and loop position, written atomically.

``output_dir/checkpoint-N/`` is built in a hidden temp dir and renamed into place, so a kill at any
moment leaves every existing checkpoint whole and never a half one under the final name. Only
safetensors and JSON are written. Under DDP/FSDP2 every rank sends its shards to rank 0, which
alone assembles and writes them (no rank but the writer ever holds the whole adapter or optimizer
state, so a save costs the other ranks their shards, at any world size); the optimizer state is
saved whole, so a checkpoint resumes on any world size.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed import DistInfo, barrier, gather_objects_to_main, gather_to_main, like_param
from ..lora import adapter_configs, adapter_names, initial_adapter, load_adapter, set_adapter_weights, write_adapter
from ..lora.io import PEFT_PREFIX, _adapter_tensors
from ..lora.atomic import atomic_directory
from ..lora.config import is_residual_init

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
RNG_NAME = "rng_state.safetensors"
SCALER_NAME = "scaler.json"
"""fp16 runs: the gradient scaler's scale and growth tracker, so a resumed run scales as this one would."""
INITIAL_NAME = "initial_adapter.safetensors"
"""PiSSA/OLoRA: the adapter's first A and B, which define the residual base (see lora.residual)."""
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT.match(entry.name)
        if match and (entry / STATE_NAME).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state tensors keyed ``<param name>::<field>`` as the optimizer holds them
    (sharded ones still sharded), and its param groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({
            "params": [names[id(p)] for p in group["params"]],
            **{k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str, list, tuple, type(None)))},
        })
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"{names[id(p)]}::{key}"] = tensor.detach()
    return tensors, {"param_groups": groups}


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    info: DistInfo = DistInfo(),
    adapter_name: str = "default",
    config_yaml: Optional[str] = None,
    total_limit: Optional[int] = None,
    scaler: Optional[Any] = None,
    extra_files: Optional[dict[str, str]] = None,
    extra_tensors: Optional[dict[str, dict[str, torch.Tensor]]] = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically (every rank must call this); with an fp16
    run's ``scaler`` (a ``torch.amp.GradScaler``) its state too, and ``extra_files`` (name -> text,
    e.g. an async GRPO run's in-flight rollouts; read on the main rank, which alone writes) and
    ``extra_tensors`` (file name -> tensors, sharded ones assembled on the main rank; every rank
    passes the same names and keys) inside the same atomic directory."""
    if adapter_name not in adapter_names(model):
        raise ValueError(f"unknown adapter '{adapter_name}'; the model has {adapter_names(model)}")
    adapter = gather_to_main({PEFT_PREFIX + k: v for k, v in _adapter_tensors(model, adapter_name).items()}, info)
    tensors, meta = _optimizer_tensors(model, optimizer)
    tensors = gather_to_main(tensors, info)
    rngs = gather_objects_to_main(_rng_state(), info)
    more = {name: gather_to_main(group, info) for name, group in (extra_tensors or {}).items()}
    initial = {f"{path}.{kind}.weight": t.detach().to("cpu").contiguous()
               for path, pair in initial_adapter(model, adapter_name).items() for kind, t in zip(("lora_A", "lora_B"), pair)}
    final = output_dir / f"checkpoint-{step}"
    if info.main:
        with atomic_directory(final, replace=True) as staging:  # a rerun of the same step replaces it
            write_adapter(staging, adapter_configs(model)[adapter_name], adapter)  # at the top level
            save_file(tensors, str(staging / OPTIMIZER_NAME))
            if initial:
                save_file(initial, str(staging / INITIAL_NAME))
            (staging / OPTIMIZER_META).write_text(json.dumps(meta, indent=1))
            save_file({f"rank{r}.{k}": v for r, rng in enumerate(rngs) for k, v in rng.items()}, str(staging / RNG_NAME))
            if scaler is not None:
                (staging / SCALER_NAME).write_text(json.dumps(scaler.state_dict(), indent=1))
            if config_yaml is not None:
                (staging / "config.yaml").write_text(config_yaml, encoding="utf-8")
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text, encoding="utf-8")
            for name, group in more.items():
                save_file(group, str(staging / name))
            (staging / STATE_NAME).write_text(json.dumps({**state, "world_size": info.world}, indent=1))
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint_adapter(path: Path, model: nn.Module, adapter_name: str = "default") -> None:
    """Restore the adapter weights (before the model is wrapped for DDP/FSDP2)."""
    raw = json.loads((path / "adapter_config.json").read_text())
    if is_residual_init(raw.get("init_lora_weights")):
        # The resumed run has already made the same PiSSA/OLoRA start (it depends only on the base
        # and the seed) and with it the same residual base; check that, then load the trained A, B.
        saved = load_file(str(path / INITIAL_NAME))
        for module, (a0, b0) in initial_adapter(model, adapter_name).items():
            for kind, now in (("lora_A", a0), ("lora_B", b0)):
                before = saved.get(f"{module}.{kind}.weight")
                if before is None or not torch.equal(before, now.to("cpu")):
                    raise ValueError(f"{path}: the {raw['init_lora_weights']} start of '{module}' differs from this "
                                     "run's; the residual base cannot be rebuilt (another base model?)")
        set_adapter_weights(model, load_file(str(path / "adapter_model.safetensors")), adapter_name)
        return
    load_adapter(model, path, adapter_name=adapter_name, trainable=True)


def load_checkpoint_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo = DistInfo(), seed: int = 0,
    scaler: Optional[Any] = None,
) -> dict[str, Any]:
    """Restore optimizer state (resharded to this run's layout), RNG and, for an fp16 run, the
    gradient ``scaler``'s state; return the loop state."""
    names = {n: p for n, p in model.named_parameters()}
    tensors = load_file(str(path / OPTIMIZER_NAME))
    meta = json.loads((path / OPTIMIZER_META).read_text())
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        current = [n for n, p in model.named_parameters() if any(p is q for q in group["params"])]
        if sorted(current) != sorted(saved["params"]):
            raise ValueError(f"{path}: the checkpoint's optimizer holds other parameters than this run's model")
    for key, value in tensors.items():
        name, _, field = key.partition("::")
        param = names[name]
        optimizer.state[param][field] = value if field == "step" else like_param(value, param)
    if scaler is not None:
        if not (path / SCALER_NAME).is_file():
            raise ValueError(f"{path}: no {SCALER_NAME} in this checkpoint, but this fp16 run scales its gradients; "
                             "it was written by a run in another dtype (resume with the same train.dtype)")
        scaler.load_state_dict(json.loads((path / SCALER_NAME).read_text()))
    state = json.loads((path / STATE_NAME).read_text())
    rng = load_file(str(path / RNG_NAME))
    mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{info.rank}.")}
    if state.get("world_size", 1) == info.world and "cpu" in mine:
        torch.set_rng_state(mine["cpu"])
        cuda = [mine[f"cuda.{i}"] for i in range(len(mine) - 1)]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    else:  # another world size: per-rank streams cannot carry over; make new ones deterministically
        torch.manual_seed(seed + 1000003 * state["step"] + info.rank)
    return state


def check_same_run(checkpoint: Path, cfg: Any, world: int, keys: tuple[str, ...], global_batch: bool = False) -> None:
    """Refuse to resume ``checkpoint`` under settings that would not continue the same run.

    Args:
        checkpoint: the checkpoint directory (its config.yaml is compared; none: nothing to check).
        cfg: this run's RunConfig.
        world: this run's number of ranks.
        keys: dotted config keys that must be equal (the data order and the adapter's math).
        global_batch: also require the same train.batch_size x ranks.
    """
    from ..config import load_config  # config builds on lora only; keep this module importable alone

    if not (checkpoint / "config.yaml").is_file():
        return
    saved = load_config(checkpoint / "config.yaml")
    saved_world = json.loads((checkpoint / STATE_NAME).read_text()).get("world_size", 1)
    changed = []
    for key in keys:
        before, now = saved, cfg
        for part in key.split("."):
            before, now = getattr(before, part), getattr(now, part)
        if before != now:
            changed.append(f"{key}: {before!r} -> {now!r}")
    if global_batch and saved.train.batch_size * saved_world != cfg.train.batch_size * world:
        changed.append(f"global batch (train.batch_size x ranks): {saved.train.batch_size} x {saved_world} -> "
                       f"{cfg.train.batch_size} x {world}")
    if changed:
        raise ValueError(f"{checkpoint} belongs to a run with other settings; resuming would not continue it: "
                         + "; ".join(changed))
