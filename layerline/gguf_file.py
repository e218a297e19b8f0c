"""Reading GGUF files: metadata as plain Python values and a table of tensors, without loading tensor data.

Built on the `gguf` package's reader, which memory-maps the file: only the pages of the tensors a stage asks for
are ever read. This module knows nothing of model architectures (see `gguf_model.py`) or of dequantization
(see `gguf_dequant.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerline.errors import CheckpointError


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order (rows first), i.e. GGUF's ne reversed
    raw: np.ndarray  # the stored bytes or elements, a view into the memory map
    n_bytes: int


class GGUFFile:
    """An opened GGUF file: `.metadata` (dict of plain values) and `.tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import gguf

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"GGUF file not found: {self.path}")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on damaged files
            raise CheckpointError(f"{self.path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as e:
                raise CheckpointError(f"{self.path}: metadata field {key!r} is unreadable: {e}") from None
        self.tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            self.tensors[t.name] = GGUFTensor(t.name, int(t.tensor_type), shape, t.data, int(t.n_bytes))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)
