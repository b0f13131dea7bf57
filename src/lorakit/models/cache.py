"""lorakit's model cache: base models built on first use (the demo model, GGUF conversions), each a
plain Hugging Face directory that appears whole or not at all.

One implementation for every cached model: a copy is built in a hidden staging directory under a
file lock and renamed into place in one step, so a reader (or a torchrun rank waiting on the lock)
never sees half a model, and a build killed midway leaves only a staging directory that nothing
reads and the next build removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Union

COMPLETE_MARKER = "config.json"
"""The file whose presence in a cache entry means the entry is complete (it only ever appears by
renaming a finished directory into place)."""


def cache_dir() -> Path:
    """lorakit's cache: ``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorakit"


def is_cached(target: Union[str, Path]) -> bool:
    """Whether ``target`` is a complete cache entry."""
    return (Path(target) / COMPLETE_MARKER).is_file()


def ensure_cached(target: Union[str, Path], build: Callable[[Path], None]) -> Path:
    """The cache entry ``target``, built by ``build(staging_dir)`` if it is not there yet.

    Safe when several processes (torchrun ranks, parallel jobs) ask at once: one builds under a file
    lock while the others wait, and the finished directory is renamed into place in one step. A
    staging directory left by a build that was killed is removed by the next build (it holds the
    lock, so no other build can still be writing there). Where no file lock exists, a loser of the
    race drops its copy. If ``build`` raises, nothing appears at ``target``.
    """
    target = Path(target)
    if is_cached(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock") as locked:
        if is_cached(target):
            return target
        if locked:
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(staging)
            if not (staging / COMPLETE_MARKER).is_file():
                raise RuntimeError(f"{target}: the build wrote no {COMPLETE_MARKER}")
            for file in staging.rglob("*"):
                if file.is_file():
                    with open(file, "rb") as handle:
                        os.fsync(handle.fileno())
            try:
                os.rename(staging, target)  # fails if another process's copy is already there
            except OSError:
                if not is_cached(target):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def write_model_dir(model: Any, tokenizer: Any, directory: Union[str, Path]) -> None:
    """Write ``model`` (a transformers causal LM) and ``tokenizer`` into the existing ``directory`` as
    a plain Hugging Face model directory: config.json, generation_config.json, one
    model.safetensors, the tokenizer files.

    Written by hand, not with ``save_pretrained``: under an initialised process group that writes
    nothing on ranks other than 0, and any rank may be the one that builds a cached copy. Tied
    weights (an output head sharing the input embedding) are stored once, as ``save_pretrained``
    stores them; ``from_pretrained`` ties them again from the config.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        where = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if where in seen and tied:
            continue
        # Untied tensors that share storage still need their own copy: safetensors refuses aliases.
        tensors[name] = tensor.detach().clone().contiguous() if where in seen else tensor.detach().contiguous()
        seen.add(where)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields whether a real lock is held."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): the atomic rename alone keeps readers safe
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
