"""GGUF files as base models: ``model: path/to/model.gguf`` (or ``--model``).

A GGUF file (llama.cpp's format, often quantized) is read by transformers' GGUF loader, dequantized
to fp32 once, and kept in lorakit's cache as a plain Hugging Face directory (safetensors weights,
config, tokenizer, chat template). Every later run loads that directory: training, generation,
serving and merging see an ordinary, unquantized model.

The cache entry is named after the file's size and a hash of its content, so an edited or replaced
file is converted again and two copies of one file share an entry. Everything that can be wrong
with the file (not GGUF, truncated, an architecture transformers cannot read) is found before the
cache is touched; the conversion itself runs in a staging directory renamed into place when done
(``cache.ensure_cached``), so a conversion that was killed is never used.

Needs the ``gguf`` and ``accelerate`` packages: ``pip install 'lorakit[gguf]'``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from .cache import cache_dir, ensure_cached, is_cached, write_model_dir

GGUF_MAGIC = b"GGUF"
INSTALL = "pip install 'lorakit[gguf]'"
CONVERSION_VERSION = 1
"""Bump when the conversion's output changes: cache entries are named after it."""

# (realpath, size, mtime_ns) -> sha256: a file is hashed once per process, however often it is resolved.
_DIGESTS: Dict[Tuple[str, int, int], str] = {}


class GgufError(ValueError):
    """A GGUF file cannot be used as a base model; the message names the file and says why."""


def is_gguf_name(name: Union[str, Path]) -> bool:
    """Whether ``model: name`` asks for a GGUF file (by its extension)."""
    return str(name).lower().endswith(".gguf")


def gguf_model_dir(path: Union[str, Path]) -> Path:
    """Where the conversion of the GGUF file ``path`` lives in the cache (it may not exist yet)."""
    path = Path(path)
    size = path.stat().st_size
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name[: -len(".gguf")] if is_gguf_name(path.name) else path.name)
    return cache_dir() / "gguf" / f"{stem[:80]}-{size}-{_sha256(path)[:16]}-v{CONVERSION_VERSION}"


def ensure_gguf_model(path: Union[str, Path], log: Optional[Callable[[str], None]] = None) -> Path:
    """The cached Hugging Face directory converted from the GGUF file ``path``, converted on first use.

    Args:
        path: a ``.gguf`` file.
        log: told once, before a conversion starts (it takes a while); not called on a cache hit.

    Raises:
        GgufError: no such file, not a GGUF file, a truncated or corrupt one, an architecture
            transformers cannot read (or not a causal LM), or gguf/accelerate not installed.
            One line naming the file; nothing is written to the cache.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise GgufError(f"model '{path}': no such file" if not path.exists() else
                        f"model '{path}': a directory, not a GGUF file")
    _check_magic(path)
    target = gguf_model_dir(path)
    if is_cached(target):  # a converted copy needs neither gguf nor accelerate
        return target
    _check_installed(path)
    architecture = _check_readable(path)
    config = _check_architecture(path, architecture)
    if log is not None:
        log(f"Converting {path.name} ({architecture}, GGUF) to a Hugging Face model in {target} "
            f"(dequantized to fp32, once; later runs load the converted copy)")
    return ensure_cached(target, lambda staging: _convert(path, config, staging))


def check_gguf_file(path: Union[str, Path]) -> str:
    """The architecture of the GGUF file ``path`` (``general.architecture``), after checking that it is
    a whole GGUF file: the magic, a header that parses, tensors that lie within the file.

    Raises:
        GgufError: no such file, not GGUF, truncated or corrupt, no tensors or no architecture; one
            line naming the file. Needs the ``gguf`` package (not transformers).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise GgufError(f"model '{path}': no such file" if not path.exists() else
                        f"model '{path}': a directory, not a GGUF file")
    _check_magic(path)
    try:
        importlib.import_module("gguf")
    except ImportError:
        raise GgufError(f"model '{path}': reading a GGUF file needs gguf, not installed: {INSTALL}") from None
    return _check_readable(path)


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _check_magic(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != GGUF_MAGIC:
        what = "empty" if not head else f"it starts with {head!r}, a GGUF file with b'GGUF'"
        raise GgufError(f"model '{path}': not a GGUF file ({what})")


def _check_installed(path: Path) -> None:
    missing = []
    for name in ("gguf", "accelerate", "transformers"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise GgufError(f"model '{path}': reading a GGUF file needs {' and '.join(missing)}, not installed: {INSTALL}")


def _check_readable(path: Path) -> str:
    """The file's architecture, after checking that its header parses and its tensors lie within it."""
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # noqa: BLE001 - the reader fails with whatever numpy raises on short data
        raise GgufError(f"model '{path}': truncated or corrupt GGUF file ({size:,} bytes): its header or tensor "
                        f"table cannot be read ({type(err).__name__}: {_first_line(err)})") from None
    if end > size:
        raise GgufError(f"model '{path}': truncated GGUF file: its tensors need {end:,} bytes, the file has {size:,}")
    if not reader.tensors:
        raise GgufError(f"model '{path}': the GGUF file holds no tensors")
    if architecture is None:
        raise GgufError(f"model '{path}': the GGUF file names no architecture (no general.architecture)")
    return architecture


def _check_architecture(path: Path, architecture: str) -> Any:
    """The transformers config the file describes; refuses an architecture transformers cannot read
    from GGUF, or one that is not a causal language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise GgufError(f"model '{path}': transformers cannot read GGUF architecture '{architecture}' "
                        f"({_first_line(err)}; readable: {', '.join(_readable_architectures())})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise GgufError(f"model '{path}': GGUF architecture '{architecture}' ({type(config).__name__}) is not a "
                        "causal language model")
    return config


def _readable_architectures() -> list:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    except ImportError:
        return []


def _convert(path: Path, config: Any, staging: Path) -> None:
    """Dequantize ``path`` to fp32 with transformers and write it to ``staging`` as a plain directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: plain nn.Linear weights, never transformers' packed GGUF modules (not trainable).
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    # The weights are now plain fp32 tensors: nothing about the model is quantized any more. Left in
    # the config, the GGUF quantization entry would make transformers (and PEFT) treat the saved
    # directory as a quantized checkpoint that cannot be trained or saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.config.dtype = torch.float32
    model.config.architectures = [type(model).__name__]
    write_model_dir(model, tokenizer, staging)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
