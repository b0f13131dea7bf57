"""Filesystem helpers shared by everything that writes a directory (models, exports, checkpoints)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a hidden staging directory next to ``target``; on success fsync its files and rename
    it to ``target``, so readers see the whole directory or none of it. On error nothing appears.

    Args:
        target: the directory to create.
        replace: an existing ``target`` is removed first (else it is an error).
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
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
