"""Optional extras: a feature whose package is missing says so in one line, before any work starts.

``require`` imports the module a feature needs and, if it is not importable, raises
``MissingExtra`` naming the feature and the pip command (``pip install 'lorakit[serve]'``).
The CLI prints it as one line and exits 2. Callers check at the start of a command or run,
before any weight is read, not where the module is first used.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional


class MissingExtra(ImportError):
    """A package of an optional extra is not importable; the message says what to install."""


def require(module: str, extra: str, feature: str, install: Optional[str] = None,
            name: Optional[str] = None) -> ModuleType:
    """Import ``module`` for ``feature``, or raise ``MissingExtra`` naming ``pip install 'lorakit[extra]'``.

    Args:
        module: the module to import ("uvicorn", "bitsandbytes").
        extra: lorakit's extra that installs it ("serve", "quant").
        feature: what needs it, as the user wrote it ("lorakit serve", "quantization: nf4").
        install: the install instruction, when it is more than the extra (vLLM's CPU build).
        name: the package's name in the message (default: ``module``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        how = install or f"pip install 'lorakit[{extra}]'"
        raise MissingExtra(f"{feature} needs {name or 'the ' + module + ' package'}, which is not importable here ({err}); "
                           f"install it: {how}") from None
