"""llama.cpp's GGUF layout of a base model: where each Hugging Face module's weight lives, and in which
row order.

Names come from the ``gguf`` package's own name map (``gguf.get_tensor_name_map``), the table
llama.cpp's ``convert_hf_to_gguf.py`` converts with, so ``model.layers.3.self_attn.q_proj`` is
``blk.3.attn_q.weight`` exactly as in a GGUF file llama.cpp wrote. One silent trap is handled here:
for Llama-architecture checkpoints (``LlamaForCausalLM``, ``MistralForCausalLM``; llama.cpp's
``LlamaModel.undo_permute``) the converter permutes the rows of q_proj and k_proj from Hugging Face's
rotary half-split order into GGML's interleaved pairs, so anything added to those weights (a LoRA B,
a merge delta) needs the same row permutation. Qwen2, Qwen3 and the Gemma family are not permuted.

A base is described from a GGUF file (architecture, heads and tensor shapes read from its header) or
a Hugging Face directory (its config), so an export can be checked against the file it will run on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

ARCHITECTURES: Dict[str, str] = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3",
}
"""Hugging Face ``model_type`` -> the GGUF ``general.architecture`` llama.cpp's converter writes for it
(Mistral checkpoints are converted as ``llama``)."""

PERMUTED = frozenset({"llama"})
"""GGUF architectures whose q/k rows llama.cpp's converter permutes (``LlamaModel.permute``)."""

# Hugging Face wraps the text model of a multimodal checkpoint (Gemma 3) one level deeper; llama.cpp's
# LoRA converter strips the same prefixes before naming.
_PREFIXES = (("model.language_model.", "model."), ("language_model.", ""))


class GgufExportError(ValueError):
    """An adapter or model cannot be written as GGUF; the message names the file and module and says
    what to do instead."""


@dataclass(frozen=True)
class BaseLayout:
    """What an export needs to know about the base model it will run on in llama.cpp."""

    name: str
    """The base as the user named it (a path, ``demo``, a named model)."""
    architecture: str
    """GGUF ``general.architecture`` (``llama``, ``qwen2``, ...)."""
    n_layers: int
    """Transformer blocks (``blk.<i>``)."""
    n_head: int
    """Attention (query) heads."""
    n_head_kv: int
    """Key/value heads (grouped-query attention)."""
    tied: bool
    """The output head is the token embedding (no ``output.weight`` of its own)."""
    gguf_path: Optional[Path] = None
    """The base's GGUF file, when it is one (an Ollama ``FROM`` line can name it)."""
    directory: Optional[Path] = None
    """The base's Hugging Face directory, when it is one."""
    tensors: Optional[Dict[str, Tuple[int, ...]]] = field(default=None, compare=False)
    """GGUF tensor name -> shape in GGML order (``ne``: ``(in, out)`` for a weight); None for a
    directory base (then only the name map is checked)."""

    def tensor_stem(self, module_path: str) -> Optional[str]:
        """The GGUF name of HF module ``module_path`` without ``.weight`` / ``.bias``
        (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``), or None if the layout has none."""
        import gguf

        for prefix, replacement in _PREFIXES:
            if module_path.startswith(prefix):
                module_path = replacement + module_path[len(prefix):]
                break
        return gguf.get_tensor_name_map(_model_arch(self.architecture), self.n_layers).get_name(module_path)

    def tensor_name(self, module_path: str) -> Optional[str]:
        """The GGUF tensor holding the weight of HF module ``module_path``
        (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``), or None if the layout has none."""
        stem = self.tensor_stem(module_path)
        return None if stem is None else f"{stem}.weight"

    def permute_rows(self, tensor_name: str, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (out, ...) of tensor ``tensor_name`` in the row order llama.cpp's file has.

        For a Llama-architecture q/k weight or bias: each head's rows go from HF's [first half; second half]
        to interleaved pairs (llama.cpp's ``LlamaModel.permute``); otherwise ``rows`` unchanged.
        """
        if self.architecture not in PERMUTED:
            return rows
        if tensor_name.endswith((".attn_q.weight", ".attn_q.bias")):
            heads = self.n_head
        elif tensor_name.endswith((".attn_k.weight", ".attn_k.bias")):
            heads = self.n_head_kv
        else:
            return rows
        out = rows.shape[0]
        return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def describe_base(base: Union[str, os.PathLike], what: str = "base") -> BaseLayout:
    """The layout of base model ``base``: a ``.gguf`` file, a Hugging Face directory, ``demo`` or a
    named model (``smollm2-135m-instruct``: its installed GGUF file).

    Raises:
        GgufExportError: the base cannot be found or read, or its architecture has no name map here;
            one line naming it.
    """
    from .demo import DEMO, DEMO_MOE, ensure_demo_model
    from .gguf import GgufError, check_gguf_file, is_gguf_name
    from .named import NAMED_MODELS, NamedModelError, named_model_file

    name = os.fspath(base)
    try:
        if name in NAMED_MODELS:
            return _from_gguf(name, named_model_file(name), check_gguf_file(named_model_file(name)))
        if is_gguf_name(name):
            path = Path(name).expanduser()
            return _from_gguf(name, path, check_gguf_file(path))
    except (GgufError, NamedModelError) as err:
        raise GgufExportError(f"{what}: {err}") from None
    if name in (DEMO, DEMO_MOE):
        return _from_directory(name, ensure_demo_model(moe=name == DEMO_MOE))
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise GgufExportError(f"{what} '{name}': not a .gguf file, a model directory with config.json, demo, or one "
                              f"of {', '.join(NAMED_MODELS)}")
    return _from_directory(name, path)


def check_architecture(architecture: str, source: str) -> None:
    """Refuse a GGUF architecture that has no name map in lorakit."""
    supported = sorted(set(ARCHITECTURES.values()))
    if architecture not in supported:
        raise GgufExportError(f"{source}: architecture '{architecture}' has no llama.cpp name map in lorakit "
                              f"(supported: {', '.join(supported)}); merge the adapter to a Hugging Face "
                              "directory (lorakit merge) and convert it with llama.cpp's convert_hf_to_gguf.py")


def _model_arch(architecture: str) -> Any:
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == architecture:
            return arch
    raise GgufExportError(f"GGUF architecture '{architecture}': the installed gguf package does not know it")


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` in a ``gguf.GGUFReader`` (a str, number or list), or ``default``."""
    item = reader.fields.get(key)
    return default if item is None else item.contents()


def _from_gguf(name: str, path: Path, architecture: str) -> BaseLayout:
    from gguf import GGUFReader

    check_architecture(architecture, f"base '{name}' ({path})")
    reader = GGUFReader(str(path))
    prefix = architecture
    n_head = gguf_field(reader, f"{prefix}.attention.head_count")
    n_layers = gguf_field(reader, f"{prefix}.block_count")
    if n_head is None or n_layers is None:
        raise GgufExportError(f"base '{name}' ({path}): no {prefix}.attention.head_count / {prefix}.block_count in "
                              "its metadata")
    tensors = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    return BaseLayout(name=name, architecture=architecture, n_layers=int(n_layers), n_head=int(n_head),
                      n_head_kv=int(gguf_field(reader, f"{prefix}.attention.head_count_kv", n_head)),
                      tied="output.weight" not in tensors, gguf_path=path.resolve(), tensors=tensors)


def _from_directory(name: str, directory: Path) -> BaseLayout:
    config = hf_text_config(directory)
    model_type = config.get("model_type")
    architecture = ARCHITECTURES.get(model_type)
    if architecture is None:
        raise GgufExportError(f"base '{name}': model_type '{model_type}' has no llama.cpp name map in lorakit "
                              f"(supported: {', '.join(sorted(ARCHITECTURES))}); merge the adapter to a Hugging "
                              "Face directory (lorakit merge) and convert it with llama.cpp's convert_hf_to_gguf.py")
    n_head = int(config["num_attention_heads"])
    return BaseLayout(name=name, architecture=architecture, n_layers=int(config["num_hidden_layers"]), n_head=n_head,
                      n_head_kv=int(config.get("num_key_value_heads") or n_head),
                      tied=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
                      directory=directory.resolve())


def hf_text_config(directory: Path) -> Dict[str, Any]:
    """The text model's part of ``directory/config.json`` (a multimodal config's ``text_config``), with
    ``tie_word_embeddings`` from the outer config where only that one says it."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GgufExportError(f"{path}: cannot read the model config ({err})") from None
    text = config.get("text_config")
    if isinstance(text, dict):
        merged = dict(text)
        if "tie_word_embeddings" not in merged and "tie_word_embeddings" in config:
            merged["tie_word_embeddings"] = config["tie_word_embeddings"]
        return merged
    return config
