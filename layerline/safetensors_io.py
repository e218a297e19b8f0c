"""A minimal safetensors reader that reads only the tensors asked for, straight into their final buffers.

The format is an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}` and the
raw little-endian data. Reading with `readinto` (rather than a memory map) means a stage touches exactly the bytes
of its own tensors and can count them. Every header field is checked before it is trusted. This module knows
nothing of models.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from layerline.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


class SafetensorsFile:
    """The header of one .safetensors file; `read(names)` loads tensors; `bytes_read` counts data bytes read."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.bytes_read = 0
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(f"{self.path}: header length {n} is impossible for a {size}-byte file")
                raw = f.read(n)
        except FileNotFoundError:
            raise CheckpointError(f"safetensors file not found: {self.path}") from None
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: the safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{self.path}: __metadata__ is not a JSON object")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in metadata.items()}
        base = 8 + n
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, base, size)

    def _entry(self, name: str, info: object, base: int, size: int) -> TensorEntry:
        try:
            dtype = DTYPES[info["dtype"]]  # type: ignore[index]
            shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
            begin, end = (int(o) for o in info["data_offsets"])  # type: ignore[index]
        except KeyError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} has an unsupported or missing field {e}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry") from None
        want = math.prod(shape) * dtype.itemsize
        if any(d < 0 for d in shape) or begin < 0 or end - begin != want or base + end > size:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} ({info['dtype']} {list(shape)}) claims bytes {begin}..{end}, which "  # type: ignore[index]
                f"do not match its size ({want} bytes) or lie beyond the end of the file"
            )
        return TensorEntry(dtype, shape, base + begin, base + end)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        with open(self.path, "rb", buffering=0) as f:
            for name in sorted(names, key=lambda n: self.entries[n].begin):
                e = self.entries[name]
                buf = torch.empty(e.end - e.begin, dtype=torch.uint8)
                f.seek(e.begin)
                view = memoryview(buf.numpy())
                got = 0
                while got < len(view):
                    k = f.readinto(view[got:])
                    if not k:
                        raise CheckpointError(f"{self.path}: file ended while reading tensor {name!r}")
                    got += k
                self.bytes_read += got
                out[name] = buf.view(e.dtype).reshape(e.shape)
        return out


_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's little-endian bytes as one flat uint8 array (a view where the tensor is contiguous): what is
    written to a file, sent over the wire, and hashed."""
    return t.detach().contiguous().view(torch.uint8).numpy().reshape(-1)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (CPU, any of the dtypes above) as one .safetensors file, with string `metadata`."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    blobs = []
    for name, t in tensors.items():
        data = raw_bytes(t.cpu())
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in blobs:
            f.write(memoryview(data))
