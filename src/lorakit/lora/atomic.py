"""Crash-safe writes: everything lorakit saves is built under a temporary name and renamed into place.

A reader (or a run resumed after a kill) sees the old file or directory or the complete new one,
never a half-written one. This is the one implementation: adapters, checkpoints, exported
models and Megatron shards all write through it. It lives in the core so that the core can use
it too (the core imports nothing else of lorakit).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable. Not every OS or filesystem lets a directory be opened
    # for this (Windows does not); there the rename is as durable as the OS makes it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a hidden staging directory next to ``target``; when the block succeeds, fsync its
    files and rename it to ``target``. If the block raises, nothing appears and the staging
    directory is removed.

    Args:
        target: the directory to create.
        replace: an existing ``target`` is removed just before the rename (else it is an error,
            raised before the block runs).

    Raises:
        FileExistsError: ``target`` exists and ``replace`` is False.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"{target}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        _fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def atomic_file(target: PathLike, write: Callable[[str], Any]) -> Path:
    """Write one file crash-safely: ``write(tmp_path)`` fills a temporary file next to ``target``,
    which is fsynced and renamed over ``target`` (an existing file is replaced in one step).

    Args:
        target: the file to create or replace; its directory is created if missing.
        write: called with the temporary path (a str) to write to.

    Returns:
        ``target`` as a Path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(Path(tmp))
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
