"""``tinker://`` paths and the PEFT-format directories they name under the server's ``--tinker-dir``.

``tinker://<model_id>/weights/<name>`` is a training state (``save_state``): the adapter in PEFT's
layout, ``optimizer.safetensors`` (AdamW moments) and ``tinker.json`` (base model, LoRA settings).
``tinker://<model_id>/sampler_weights/<name>`` (``save_weights_for_sampler``) holds the adapter and
``tinker.json`` only. Either directory loads in PEFT, vLLM, or ``lorakit serve --adapter``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ...lora import LoraConfig
from ...lora.atomic import atomic_directory
from ...lora.io import CONFIG_NAME, WEIGHTS_NAME
from .futures import TinkerError

KINDS = {"weights": "training", "sampler_weights": "sampler"}
OPTIMIZER_NAME = "optimizer.safetensors"
META_NAME = "tinker.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def tinker_path(model_id: str, kind: str, name: str) -> str:
    return f"tinker://{model_id}/{kind}/{name}"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise TinkerError(f"invalid checkpoint name {name!r}: use letters, digits, '.', '_' or '-' "
                          "(at most 128, not starting with '.' and without '..')")
    return name


def resolve(root: Path, path: object) -> tuple[Path, str, str]:
    """The directory a ``tinker://`` path names, checked to lie inside ``root`` and to exist.

    Returns:
        ``(directory, model_id, kind)``.
    """
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise TinkerError(f"invalid path {path!r}: expected tinker://<model_id>/weights/<name> or "
                          "tinker://<model_id>/sampler_weights/<name>")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or parts[1] not in KINDS or not parts[0] or not parts[2]:
        raise TinkerError(f"invalid path {path!r}: expected tinker://<model_id>/weights/<name> or "
                          "tinker://<model_id>/sampler_weights/<name>")
    root = root.resolve()
    directory = (root / parts[0] / parts[1] / parts[2]).resolve()
    if root not in directory.parents:
        raise TinkerError(f"path {path!r} points outside this server's --tinker-dir")
    if not (directory / CONFIG_NAME).is_file():
        raise TinkerError(f"unknown checkpoint {path!r}: nothing was saved there")
    return directory, parts[0], parts[1]


def write(directory: Path, config: LoraConfig, tensors: dict[str, torch.Tensor], meta: dict,
          optimizer: Optional[dict[str, torch.Tensor]], overwrite: bool) -> None:
    """Write a checkpoint directory atomically (a reader sees the old one or the whole new one)."""
    if directory.exists() and not overwrite:
        raise TinkerError(f"a checkpoint already exists at {directory.name!r} for this model; pass overwrite=True "
                          "or choose another name")
    with atomic_directory(directory, replace=True) as staging:
        (staging / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        if optimizer is not None:
            save_file(optimizer, str(staging / OPTIMIZER_NAME))
        (staging / META_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_meta(directory: Path) -> dict:
    path = directory / META_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TinkerError(f"{path}: unreadable checkpoint metadata ({err})", "server") from None


def read_optimizer(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / OPTIMIZER_NAME
    if not path.is_file():
        raise TinkerError(f"{directory.name}: this checkpoint has no optimizer state (save it with save_state, "
                          "or load its weights only)")
    return load_file(str(path))
