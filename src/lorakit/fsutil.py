"""Crash-safe directory writes for the code outside the core.

The implementation lives in the core (:mod:`lorakit.lora.atomic`), which may import nothing
else of lorakit; this name is kept so that ``from lorakit.fsutil import atomic_directory``
goes on working.
"""

from .lora.atomic import atomic_directory, atomic_file

__all__ = ["atomic_directory", "atomic_file"]
