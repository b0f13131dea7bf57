"""Base + adapter, merged, as one GGUF file llama.cpp and Ollama load (``lorakit merge --format gguf``).

The merge itself is lorakit's (``merge_lora`` in fp32 on the dequantized base: DoRA, ``modules_to_save``
and ``lm_head`` LoRA included, which a llama.cpp adapter cannot hold). What is written depends on where
the base came from:

- **a GGUF base** (a ``.gguf`` file or a named model): the base file is the template. Every metadata key
  (architecture hyper-parameters, tokenizer, chat template) is copied as it is; every tensor is the
  base's, dequantized, except those of the modules the adapter changed, which are the merged weights
  in the file's layout (Llama q/k rows permuted as the base's). Any architecture with a name map.
- **a Hugging Face directory** (or ``demo``): written from the config and the tokenizer, for the
  Llama, Mistral, Qwen2 and Qwen3 families with a byte-level BPE tokenizer (``tokenizer.ggml.*``: tokens,
  types, merges, the pre-tokenizer llama.cpp should split with, special ids, chat template).

``outtype`` is the type of the 2-D weights (``f32``, ``f16`` or ``q8_0``; rows whose length is not a
multiple of Q8_0's 32-value block are written f16, as llama.cpp's converter does); vectors (norms,
biases) stay f32. An Ollama Modelfile (``FROM ./<file>``) is written beside the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ..lora.atomic import atomic_file
from ..lora.io import read_adapter
from .gguf_adapter import new_outputs, write_modelfile
from .gguf_layout import BaseLayout, GgufExportError, describe_base

MERGED_OUTTYPES = ("f32", "f16", "q8_0")
"""Types of a merged GGUF's 2-D weights."""
HF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
"""GGUF architectures written from a Hugging Face directory (Mistral is ``llama``)."""

# tokenizer.json pre-tokenizer split patterns -> llama.cpp's tokenizer.ggml.pre (llama-vocab.cpp). The
# two families lorakit writes from a directory; anything else byte-level gets "gpt-2" (GPT-2's own
# regex) or "default", and the log says so.
_PRE_PATTERNS = ((r"\p{N}{1,3}", "llama-bpe"), (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|", "qwen2"))


def export_merged_gguf(model: str, adapter: Union[str, os.PathLike], out: Union[str, os.PathLike],
                       outtype: str = "f32", log: Callable[[str], None] = lambda _m: None) -> Tuple[Path, Path]:
    """Merge ``adapter`` into base ``model`` and write one GGUF file ``out`` plus an Ollama Modelfile.

    Args:
        model: the base (a .gguf file, a named model, a Hugging Face directory, ``demo``).
        adapter: the adapter directory (PEFT layout).
        out: the .gguf file to write; must not exist (nor ``<stem>.Modelfile``).
        outtype: ``f32``, ``f16`` or ``q8_0`` (the 2-D weights).
        log: progress for the user.

    Returns:
        ``(out, modelfile)``.

    Raises:
        GgufExportError: an architecture or tokenizer lorakit cannot write, a module with no GGUF tensor.
        FileExistsError: ``out`` or its Modelfile exists (nothing is written).
    """
    import gguf

    from ..lora import load_adapter, merge_lora, unload_lora
    from .loading import load_model, load_tokenizer, resolve_model

    out, modelfile = new_outputs(out)
    if outtype not in MERGED_OUTTYPES:
        raise GgufExportError(f"--outtype {outtype!r}: a merged model is written as one of {', '.join(MERGED_OUTTYPES)}")
    config, tensors, source = read_adapter(adapter)  # a bad adapter fails before the (slow) model load
    layout = describe_base(model, what="--model")
    if layout.gguf_path is None and layout.architecture not in HF_ARCHITECTURES:
        raise GgufExportError(f"--model '{model}': writing a {layout.architecture} model from a Hugging Face directory "
                              f"is not supported (only {', '.join(HF_ARCHITECTURES)}); start from the base's GGUF file "
                              "(--model file.gguf), or merge to a directory and convert it with llama.cpp's "
                              "convert_hf_to_gguf.py")
    touched = _touched_modules(tensors)
    for module in touched:  # every changed weight needs a place in the file, checked before the merge runs
        if layout.tensor_stem(module) is None:
            raise GgufExportError(f"{source}: module '{module}' has no tensor in llama.cpp's '{layout.architecture}' "
                                  "layout; merge to a Hugging Face directory instead (lorakit merge --format hf)")
    directory = resolve_model(model, log=log)
    plain = load_model(directory, dtype=torch.float32).eval()
    load_adapter(plain, adapter)
    merge_lora(plain)
    plain = unload_lora(plain, merge=True)
    qtype = getattr(gguf.GGMLQuantizationType, {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[outtype])

    if layout.gguf_path is not None:
        tensors_out, copy_from = _over_gguf_base(plain, layout, touched), layout.gguf_path
    else:
        tensors_out, copy_from = _from_directory(plain, layout), None
    tokenizer = load_tokenizer(directory) if copy_from is None else None

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, layout.architecture)
        if copy_from is not None:
            _copy_metadata(writer, copy_from, outtype)
        else:
            _hf_metadata(writer, plain.config, layout, outtype, Path(str(directory)).name)
            _hf_tokenizer(writer, tokenizer, plain.config.get_text_config().vocab_size, log)
        for name, array in tensors_out:
            _add_tensor(writer, name, array, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_file(out, write)
    write_modelfile(modelfile, [f"FROM ./{out.name}"], out)
    origin = f"over {layout.gguf_path.name}'s tensors and metadata" if copy_from else "from the Hugging Face model"
    log(f"Wrote {out}: the merged model as GGUF ({outtype}, architecture {layout.architecture}, {origin}) and "
        f"{modelfile} (Ollama)")
    return out, modelfile


def _touched_modules(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """The HF modules whose weights the adapter changes (LoRA, DoRA or trained in full)."""
    found = set()
    for key in tensors:
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B",
                       ".lora_magnitude_vector", ".base_layer.weight"):
            if key.endswith(suffix):
                found.add(key[: -len(suffix)])
                break
        else:  # modules_to_save: '<module>.weight' / '<module>.bias'
            found.add(key.rsplit(".", 1)[0])
    return sorted(found)


def _hf_tensor(layout: BaseLayout, name: str, stem: str, value: torch.Tensor) -> Tuple[str, np.ndarray]:
    """One HF parameter as the GGUF tensor ``<stem>.<weight|bias>`` (rows permuted where llama.cpp's are)."""
    full = f"{stem}.{name.rsplit('.', 1)[1]}"
    return full, layout.permute_rows(full, value.detach().float()).contiguous().numpy()


def _over_gguf_base(plain: Any, layout: BaseLayout, touched: List[str]) -> List[Tuple[str, np.ndarray]]:
    """The base file's tensors, dequantized, with the changed modules' merged weights in their place (a
    head the merge untied from the embedding is added as ``output.weight``)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    merged: Dict[str, np.ndarray] = {}
    params = dict(plain.named_parameters(remove_duplicate=False))
    head, embedding = _head_path(plain), _embedding_path(plain)
    if layout.tied and (head in touched or embedding in touched):
        # One tensor in the base file serves both: lorakit's merge changed both views of it, so both
        # are written (llama.cpp prefers output.weight when the file has one).
        touched = sorted(set(touched) | {head, embedding})
    for module in touched:
        stem = layout.tensor_stem(module)
        for name in (f"{module}.weight", f"{module}.bias"):
            if name in params:
                full, array = _hf_tensor(layout, name, stem, params[name])
                merged[full] = array
    reader = GGUFReader(str(layout.gguf_path))
    out: List[Tuple[str, np.ndarray]] = []
    for tensor in reader.tensors:
        if tensor.name in merged:
            out.append((tensor.name, merged.pop(tensor.name)))
        else:
            array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
            out.append((tensor.name, array.reshape(tuple(int(n) for n in reversed(tensor.shape)))))
    out.extend(sorted(merged.items()))  # output.weight of a tied base whose head the adapter changed
    return out


def _from_directory(plain: Any, layout: BaseLayout) -> List[Tuple[str, np.ndarray]]:
    """Every parameter of the merged HF model under its GGUF name; a tied head is left out (llama.cpp
    uses the token embedding when the file has no ``output.weight``)."""
    text = plain.config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GgufExportError(f"--model: rope_type '{rope.get('rope_type')}' is not written by lorakit (only the "
                              "default rotary embedding); start from the base's GGUF file instead")
    out = []
    for name, value in plain.named_parameters():  # a tied head is the embedding's parameter: listed once
        module = name.rsplit(".", 1)[0]
        stem = layout.tensor_stem(module)
        if stem is None:
            raise GgufExportError(f"--model: parameter '{name}' has no tensor in llama.cpp's '{layout.architecture}' "
                                  "layout")
        out.append(_hf_tensor(layout, name, stem, value))
    return out


def _embedding_path(plain: Any) -> str:
    embedding = plain.get_input_embeddings()
    return next(name for name, module in plain.named_modules() if module is embedding)


def _head_path(plain: Any) -> str:
    head = plain.get_output_embeddings()
    return next((name for name, module in plain.named_modules() if module is head), "lm_head")


def _add_tensor(writer: Any, name: str, array: np.ndarray, qtype: Any) -> None:
    import gguf
    from gguf import quants

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32 == 0:
        writer.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)
    else:  # f16, or a row length Q8_0's blocks do not divide
        writer.add_tensor(name, array.astype(np.float16))


def _file_type(outtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def _copy_metadata(writer: Any, path: Path, outtype: str) -> None:
    """Every key of the base file (hyper-parameters, tokenizer, chat template) but its file type."""
    import gguf
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type",
                                                            "general.quantization_version"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _hf_metadata(writer: Any, config: Any, layout: BaseLayout, outtype: str, name: str) -> None:
    """The hyper-parameters llama.cpp reads for the llama / qwen2 / qwen3 graphs, from the HF config."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    writer.add_name(name)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(layout.n_head)
    writer.add_head_count_kv(layout.n_head_kv)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(text.vocab_size)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(__import__("gguf").GGML_QUANT_VERSION)


def _hf_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, log: Callable[[str], None]) -> None:
    """``tokenizer.ggml.*`` from a byte-level BPE tokenizer (what llama.cpp's ``gpt2`` tokenizer model runs)."""
    import gguf

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise GgufExportError("--model: the tokenizer is not a byte-level BPE (SentencePiece-style, or "
                              f"{model.get('type')}): lorakit writes GGUF vocabularies for byte-level BPE only; start "
                              "from the base's GGUF file (--model file.gguf), or merge to a directory and convert it "
                              "with llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        if i not in by_id:  # the model's embedding is padded beyond the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    pre = _pre_tokenizer(data.get("pre_tokenizer"))
    if pre in ("gpt-2", "default"):
        log(f"Tokenizer: the pre-tokenizer is none llama.cpp names; writing tokenizer.ggml.pre = '{pre}'")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not merges:
        # llama.cpp's gpt2 vocabulary needs a merges key, and gguf writes no empty array. A tokenizer
        # without merges (the demo model's: bytes only) gets one that can never apply: a special
        # token with itself (BPE only ever merges pieces of ordinary text).
        control = [t for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL]
        if not control:
            raise GgufExportError("--model: the tokenizer has no BPE merges and no special token; llama.cpp's "
                                  "vocabulary needs merges")
        merges = [f"{control[0]} {control[0]}"]
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(spec: Optional[dict]) -> str:
    text = json.dumps(spec or {})
    patterns = [p for p in _iter_split_patterns(spec)]
    for needle, name in _PRE_PATTERNS:
        if any(needle in p for p in patterns):
            return name
    return "gpt-2" if '"use_regex": true' in text and not patterns else "default"


def _iter_split_patterns(spec: Any) -> Iterator[str]:
    if isinstance(spec, dict):
        if spec.get("type") == "Split":
            pattern = spec.get("pattern") or {}
            yield pattern.get("Regex") or pattern.get("String") or ""
        for value in spec.values():
            yield from _iter_split_patterns(value)
    elif isinstance(spec, list):
        for value in spec:
            yield from _iter_split_patterns(value)
