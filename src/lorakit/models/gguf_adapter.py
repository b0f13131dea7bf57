"""A PEFT LoRA adapter as a llama.cpp LoRA adapter GGUF (``lorakit export-adapter ... --format gguf``).

What llama.cpp reads (``llama-adapter.cpp``; ``convert_lora_to_gguf.py`` writes the same):
``general.type = "adapter"``, ``general.architecture`` = the base's, ``adapter.type = "lora"``,
``adapter.lora.alpha`` (float32), and per adapted weight two tensors named after the base's tensor:
``<base tensor>.lora_a`` = PEFT's A (r, in) and ``<base tensor>.lora_b`` = PEFT's B (out, r), as they
are, except the token embedding's A, which is written transposed (vocab, r) because llama.cpp gathers
its rows by token. llama.cpp scales every pair by ``alpha / r`` with r read from that pair's B.

So that the file computes exactly what lorakit computes:

- the q/k B rows of a Llama-architecture base are permuted as the base's q/k rows were
  (``BaseLayout.permute_rows``); without it the adapter is silently as good as absent;
- rsLoRA (``alpha / sqrt(r)``) and per-module ``alpha_pattern`` are folded into B, so that
  ``file alpha / r`` times the written B is lorakit's scale times B (per-module ranks need no
  folding: llama.cpp reads each one);
- what llama.cpp cannot apply is refused before anything is written, naming the module: DoRA
  magnitudes, ``modules_to_save`` (fully trained copies), LoRA on ``lm_head`` when the base ties it to
  the embedding, a module with no tensor in the architecture's layout. ``lorakit merge --format gguf``
  is the way out for all of them but the last.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

from ..lora.atomic import atomic_file
from ..lora.config import LoraConfig
from ..lora.io import read_adapter
from .gguf_layout import BaseLayout, GgufExportError, check_architecture, describe_base

ADAPTER_OUTTYPES = ("f32", "f16")
"""Tensor types of an exported adapter (llama.cpp computes the LoRA branch in the adapter's type)."""

_LINEAR = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")


@dataclass
class GgufLoraPair:
    """One adapted base tensor, as llama.cpp will apply it."""

    module: str
    """The HF module path (``model.layers.0.self_attn.q_proj``)."""
    tensor: str
    """The base's GGUF tensor (``blk.0.attn_q.weight``)."""
    a: torch.Tensor
    """``lora_a`` as written: (r, in); for the token embedding (vocab, r). fp32."""
    b: torch.Tensor
    """``lora_b`` as written: (out, r), rows in the base file's order, lorakit's scale folded in
    beyond ``alpha / r``. fp32."""
    scale: float
    """What llama.cpp multiplies ``b @ a`` by: ``file alpha / r``."""

    @property
    def embedding(self) -> bool:
        return self.tensor == "token_embd.weight"

    def delta(self) -> torch.Tensor:
        """The change to the base tensor, in the GGUF file's numpy orientation ((out, in); the token
        embedding (vocab, dim)), fp32."""
        if self.embedding:
            return (self.a @ self.b.T) * self.scale
        return (self.b @ self.a) * self.scale


def gguf_lora_pairs(config: LoraConfig, tensors: dict, base: BaseLayout, source: str) -> List[GgufLoraPair]:
    """The adapter's pairs in llama.cpp's layout for ``base``, with ``adapter.lora.alpha = config.alpha``.

    Args:
        config: the adapter's config.
        tensors: its tensors keyed ``<module path>.lora_A.weight`` etc. (no PEFT prefix; ``read_adapter``).
        base: the base's layout.
        source: the adapter file, for messages.

    Raises:
        GgufExportError: what llama.cpp cannot apply (see the module docstring), one line naming the
            module and the way out.
    """
    merge_hint = "merge it into the base instead: lorakit merge --format gguf"
    if config.use_dora:
        dora = sorted(k[: -len(".lora_magnitude_vector")] for k in tensors if k.endswith(".lora_magnitude_vector"))
        where = f"module '{dora[0]}'" if dora else "every module"
        raise GgufExportError(f"{source}: {where} is DoRA (use_dora): llama.cpp applies plain LoRA only; {merge_hint}")
    if config.target_parameters:
        raise GgufExportError(f"{source}: LoRA on parameters ({', '.join(config.target_parameters)}; "
                              f"target_parameters) has no llama.cpp adapter form; {merge_hint}")
    check_architecture(base.architecture, f"base '{base.name}'")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for suffix, part in zip(_LINEAR + _EMBEDDING, ("a", "b", "a", "b")):
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                pairs.setdefault(module, {})[part] = value
                pairs[module]["embedding"] = suffix in _EMBEDDING
                break
        else:
            if key.endswith(".base_layer.weight"):
                # PEFT saves the base embedding next to an embedding LoRA (save_embedding_layers): a copy
                # of the base, skipped as llama.cpp's converter skips it (a resized vocabulary shows up
                # as a shape mismatch against a GGUF base).
                continue
            if key.endswith(".lora_magnitude_vector"):
                raise GgufExportError(f"{source}: module '{key.rsplit('.', 1)[0]}' is DoRA (lora_magnitude_vector): "
                                      f"llama.cpp applies plain LoRA only; {merge_hint}")
            module = key.rsplit(".", 1)[0]
            raise GgufExportError(f"{source}: module '{module}' is trained in full (modules_to_save: '{key}'): a "
                                  f"llama.cpp adapter holds LoRA pairs only; {merge_hint}")
    out: List[GgufLoraPair] = []
    for module in sorted(pairs):
        parts = pairs[module]
        if "a" not in parts or "b" not in parts:
            raise GgufExportError(f"{source}: module '{module}' has only one of its LoRA A / B tensors")
        tensor = base.tensor_name(module)
        if tensor is None:
            raise GgufExportError(f"{source}: module '{module}' has no tensor in llama.cpp's '{base.architecture}' "
                                  f"layout; {merge_hint}")
        if tensor == "output.weight" and base.tied:
            raise GgufExportError(f"{source}: module '{module}' (LoRA on the output head) cannot be applied by "
                                  f"llama.cpp: base '{base.name}' ties the head to the token embedding (no merge can "
                                  "change one without the other either); train without lm_head in target_modules, or "
                                  "with lm_head in modules_to_save and lorakit merge --format gguf")
        a, b = parts["a"].float(), parts["b"].float()
        if parts["embedding"]:  # PEFT: A (r, vocab), B (dim, r); llama.cpp gathers A's rows by token
            a = a.T.contiguous()
        rank = b.shape[1]
        alpha = config.alpha_for(module)
        lorakit_scale = alpha / (math.sqrt(rank) if config.use_rslora else rank)
        file_scale = config.alpha / rank
        if lorakit_scale != file_scale:
            b = b * (lorakit_scale / file_scale)
        b = base.permute_rows(tensor, b).contiguous()
        pair = GgufLoraPair(module=module, tensor=tensor, a=a, b=b, scale=file_scale)
        _check_shape(pair, base, source)
        out.append(pair)
    if not out:
        raise GgufExportError(f"{source}: the adapter holds no LoRA pairs")
    return out


def _check_shape(pair: GgufLoraPair, base: BaseLayout, source: str) -> None:
    """The pair fits the base's tensor, as llama.cpp checks it (GGML order: ``ne = (in, out)``)."""
    if base.tensors is None:
        return
    shape = base.tensors.get(pair.tensor)
    if shape is None:
        raise GgufExportError(f"{source}: module '{pair.module}' maps to '{pair.tensor}', which base "
                              f"'{base.name}' does not have (a different base model?)")
    # The tensor's numpy shape: (out, in); the token embedding's (vocab, dim).
    rows_out, cols_in = (pair.a.shape[0], pair.b.shape[0]) if pair.embedding else (pair.b.shape[0], pair.a.shape[1])
    if tuple(shape) != (cols_in, rows_out):
        raise GgufExportError(f"{source}: module '{pair.module}' adapts a ({rows_out}, {cols_in}) weight, but "
                              f"'{pair.tensor}' of base '{base.name}' is ({shape[1]}, {shape[0]}) (a different base "
                              "model?)")


def export_adapter_gguf(adapter: Union[str, os.PathLike], out: Union[str, os.PathLike],
                        base: Optional[Union[str, os.PathLike]] = None, outtype: str = "f32",
                        log: Callable[[str], None] = lambda _m: None) -> tuple[Path, Path]:
    """Write ``adapter`` (a PEFT directory) as a llama.cpp LoRA adapter ``out`` (.gguf), and an Ollama
    Modelfile beside it (``<out stem>.Modelfile``: ``FROM <base>`` / ``ADAPTER ./<out name>``).

    Args:
        adapter: the adapter directory.
        out: the GGUF file to write; must not exist (nor its Modelfile).
        base: the base model (a .gguf file, a model directory, ``demo``, a named model); default: the
            adapter config's ``base_model_name_or_path``. With a GGUF base every tensor is checked
            against the file's names and shapes.
        outtype: ``f32`` or ``f16``.
        log: told what was written.

    Returns:
        ``(out, modelfile)``.

    Raises:
        GgufExportError: what llama.cpp cannot apply, an unknown architecture, no base to be found.
        FileExistsError: ``out`` or its Modelfile exists (nothing is written).
    """
    import gguf

    out, modelfile = new_outputs(out)
    if outtype not in ADAPTER_OUTTYPES:
        raise GgufExportError(f"--outtype {outtype!r}: an adapter is written as one of {', '.join(ADAPTER_OUTTYPES)}")
    config, tensors, source = read_adapter(adapter)
    base_name = base if base is not None else config.base_model_name_or_path
    if not base_name:
        raise GgufExportError(f"{source}: the adapter config names no base model (base_model_name_or_path); give it "
                              "with --base (a .gguf file, a model directory, demo or a named model)")
    layout = describe_base(base_name, what="--base" if base is not None else f"{source}: base_model_name_or_path")
    pairs = gguf_lora_pairs(config, tensors, layout, source)
    dtype = {"f32": torch.float32, "f16": torch.float16}[outtype]

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, layout.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.alpha))
        writer.add_name(Path(adapter).name)
        for pair in pairs:
            writer.add_tensor(f"{pair.tensor}.lora_a", pair.a.to(dtype).numpy())
            writer.add_tensor(f"{pair.tensor}.lora_b", pair.b.to(dtype).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_file(out, write)
    base_ref = layout.gguf_path or layout.directory
    write_modelfile(modelfile, [f"FROM {base_ref}", f"ADAPTER ./{out.name}"], out)
    log(f"Wrote {out}: a llama.cpp LoRA adapter ({len(pairs)} tensor pairs, {outtype}, architecture "
        f"{layout.architecture}{', q/k rows permuted as the base' if layout.architecture == 'llama' else ''}) "
        f"and {modelfile} (Ollama)")
    return out, modelfile


def new_outputs(out: Union[str, Path]) -> tuple[Path, Path]:
    """``out`` and the Modelfile beside it, refused if either exists (nothing is overwritten)."""
    out = Path(out)
    modelfile = modelfile_path(out)
    for target in (out, modelfile):
        if target.exists():
            raise FileExistsError(f"{target}: already exists; pick a new output file (nothing was written)")
    return out, modelfile


def modelfile_path(out: Path) -> Path:
    """The Ollama Modelfile written beside GGUF ``out``: ``kit.gguf`` -> ``kit.Modelfile``."""
    return out.with_name((out.name[: -len(".gguf")] if out.name.lower().endswith(".gguf") else out.name) + ".Modelfile")


def write_modelfile(path: Path, lines: List[str], gguf_file: Path) -> Path:
    """Write an Ollama Modelfile (atomically), headed by the commands that use it."""
    name = path.name[: -len(".Modelfile")].lower() or "model"
    head = [f"# Ollama: ollama create {name} -f {path.name} && ollama run {name}",
            f"# llama.cpp reads {gguf_file.name} directly; this file is for Ollama only."]
    text = "\n".join(head + lines) + "\n"
    return atomic_file(path, lambda tmp: Path(tmp).write_text(text))
