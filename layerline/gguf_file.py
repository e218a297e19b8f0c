"""Reading GGUF files: metadata as plain Python values and a table of tensors, without loading tensor data.

The file is memory-mapped and its header parsed here with bounds checks on every length and offset, so a damaged
file is a `CheckpointError`, never a crash; only the pages of the tensors a stage asks for are ever read. Arrays of
strings (the vocabulary, the merges: hundreds of thousands of them) are checked and skipped, and only turned into
Python values when asked for (`get`, `metadata`): a stage that loads weights never holds them. (The
`gguf` package's reader builds numpy objects for every vocabulary string and takes seconds on a 49k-token
vocabulary; this parser takes a fraction of that; the type table is layerline's own, `ggml_types.py`.) This module knows
nothing of model architectures (`gguf_model.py`) or of dequantization (`gguf_dequant.py`).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerline.errors import CheckpointError
from layerline.ggml_types import GGML_TYPES

# GGUF value types -> struct format of the scalar ones
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 8


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order (rows first), i.e. GGUF's ne reversed
    raw: np.ndarray  # the stored bytes (uint8, flat), a read-only view into the memory map
    n_bytes: int
    offset: int  # where the bytes start in the file


@dataclass(frozen=True)
class _Deferred:
    offset: int  # where the array's header starts in the file


class _Parser:
    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a readable GGUF file: {what} (at byte {self.pos})")

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"needs {n} more bytes but the file ends")
        p = self.pos
        self.pos += n
        return p

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        p = self.take(n)
        try:
            return self.buf[p : p + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not valid UTF-8") from None

    def value(self, vtype: int, lazy: bool = False) -> Any:
        """The value at the current position; with `lazy`, an array of strings is skipped (each length checked)
        and left as a `_Deferred` to decode later."""
        if lazy and vtype == _ARRAY:
            start = self.pos
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype == _STRING:
                if count > self.size - self.pos:
                    raise self.fail(f"an array claims {count} items")
                for _ in range(count):
                    self.take(self.scalar("<Q"))
                return _Deferred(start)
            self.pos = start
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _SCALARS:  # one unpack for the whole array
                fmt = _SCALARS[itype]
                width = struct.calcsize(fmt)
                p = self.take(count * width)
                return list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, p))
            if count > self.size - self.pos:
                raise self.fail(f"an array claims {count} items")
            return [self.value(itype) for _ in range(count)]
        raise self.fail(f"unknown value type {vtype}")


class GGUFFile:
    """An opened GGUF file: `.metadata` (dict of plain values) and `.tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise CheckpointError(f"{self.path} is not a readable GGUF file: it is empty") from None
        p = _Parser(self._map, self.path)
        if p.size < 4 or self._map[:4] != b"GGUF":
            raise CheckpointError(f"{self.path} is not a GGUF file (no GGUF magic)")
        p.take(4)
        version = p.scalar("<I")
        if version not in (2, 3):
            raise p.fail(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = p.scalar("<Q"), p.scalar("<Q")
        if n_tensors > p.size or n_kv > p.size:
            raise p.fail(f"the header claims {n_tensors} tensors and {n_kv} metadata keys")
        self._parser = p
        self._metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = p.string()
            self._metadata[key] = p.value(p.scalar("<I"), lazy=True)
        infos = []
        for _ in range(n_tensors):
            name = p.string()
            n_dims = p.scalar("<I")
            if n_dims > MAX_DIMS:
                raise p.fail(f"tensor {name!r} claims {n_dims} dimensions")
            dims = [p.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, p.scalar("<I"), p.scalar("<Q")))
        alignment = self._metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise p.fail(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-p.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, qtype, offset in infos:
            self.tensors[name] = self._tensor(p, name, dims, qtype, data_start + offset)

    def _tensor(self, p: _Parser, name: str, dims: list[int], qtype: int, start: int) -> GGUFTensor:
        if qtype not in GGML_TYPES:
            raise p.fail(f"tensor {name!r} has unknown type {qtype}")
        _, block, block_bytes = GGML_TYPES[qtype]
        count = math.prod(dims)
        if dims and dims[0] % block:
            raise p.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of its block size {block}")
        n_bytes = count // block * block_bytes
        if start + n_bytes > p.size:
            raise CheckpointError(f"{self.path}: tensor {name!r} lies beyond the end of the file (truncated download?)")
        raw = np.frombuffer(self._map, dtype=np.uint8, count=n_bytes, offset=start)
        return GGUFTensor(name, qtype, tuple(reversed(dims)), raw, n_bytes, start)

    def get(self, key: str, default: Any = None) -> Any:
        value = self._metadata.get(key, default)
        if isinstance(value, _Deferred):
            p = self._parser
            p.pos = value.offset
            value = self._metadata[key] = p.value(_ARRAY)
        return value

    def array_length(self, key: str) -> int | None:
        """How many items the array under `key` has (None: no such array), without decoding a deferred one."""
        value = self._metadata.get(key)
        if isinstance(value, _Deferred):
            return struct.unpack_from("<Q", self._map, value.offset + 4)[0]
        return len(value) if isinstance(value, list) else None

    @property
    def metadata(self) -> dict[str, Any]:
        """Every key with its value (deferred arrays decoded now)."""
        return {key: self.get(key) for key in self._metadata}

    def read_bytes(self, tensor: GGUFTensor) -> np.ndarray:
        """A copy of a tensor's stored bytes in memory of its own (uint8, flat), read with pread rather than
        through the memory map, so that the file's pages never count in this process's memory."""
        out = np.empty(tensor.n_bytes, dtype=np.uint8)
        view = memoryview(out).cast("B")
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < tensor.n_bytes:
                n = os.preadv(f.fileno(), [view[done:]], tensor.offset + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: tensor {tensor.name!r} is cut short (truncated file?)")
                done += n
        return out
