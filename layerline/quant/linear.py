"""Matmuls and embedding lookups on quantized weights (`QTensor`s), through the kernels of `kernels.c`.

`QuantLinear` is y = x @ W^T (+ b) for a W of one or more QTensors stacked along the output (q, k and v; gate and
up), each of its own type. Steps of few rows (decode, batched decode) run the kernels' integer dot products straight
from the blocks; steps of many rows (prefill) decode tiles of W to float32 a few hundred rows at a time and multiply
them with torch's matmul (compute-bound there, where torch's GEMM is the fastest thing on hand; the tile is the only
float copy and is reused). Both take the layer's small fusions: an RMSNorm of the input, SwiGLU of a [gate | up]
input, and adding into an output (the residual) instead of allocating one.

Activations are float32 in and out. The kernels quantize them to 8 bits per value in blocks, as llama.cpp does, so
results differ from a float32 matmul on the dequantized weights by that rounding (~1e-2 relative; the tests state
it); the exact mode (`--dtype float32`) does not come here.
"""

from __future__ import annotations

import ctypes
import threading

import torch
import torch.nn.functional as F

from layerline.quant.build import kernels
from layerline.quant.tensor import QTensor

MAX_PARTS = 4
PRE_NONE, PRE_RMSNORM, PRE_SWIGLU = 0, 1, 2
# From this many rows on, a matmul on a weight in the file's row layout (the k-quants, Q5_1, F16...) dequantizes
# it in tiles and runs torch's float32 GEMM; a weight interleaved by 8 rows (Q4_0, Q4_1, Q5_0, Q8_0) always goes
# through the kernels, which beat the tiles at every row count measured (bench/quant_kernels.py)
TILE_MIN_ROWS = 32
TILE_FLOATS = 1 << 18  # floats in one dequantized tile (1 MiB)


class _Part(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int32), ("layout", ctypes.c_int32), ("n", ctypes.c_int64), ("w", ctypes.c_void_p)]


class _Weight(ctypes.Structure):
    _fields_ = [
        ("nparts", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("k", ctypes.c_int64),
        ("parts", _Part * MAX_PARTS),
    ]


_scratch = threading.local()


def _buffer(name: str, nbytes: int) -> torch.Tensor:
    """A per-thread byte buffer of at least nbytes, reused across calls (grown when needed)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
        setattr(_scratch, name, buf)
    return buf


class QuantLinear:
    """See the module docstring. Holds its parts (their memory is the weight's)."""

    def __init__(self, parts: list[QTensor], bias: torch.Tensor | None = None) -> None:
        if not 1 <= len(parts) <= MAX_PARTS:
            raise ValueError(f"a quantized linear takes 1 to {MAX_PARTS} parts, got {len(parts)}")
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError("the parts of a quantized linear must have the same number of columns")
        self.lib = kernels()
        self.parts = [p.repack() for p in parts]  # interleaved in place where the kernels can (same bytes)
        self.interleaved = all(p.layout == 8 for p in self.parts)
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ValueError(f"bias of shape {tuple(self.bias.shape)} for {self.out_features} outputs")
        self._desc = _Weight()
        self._desc.nparts, self._desc.k = len(parts), self.in_features
        for i, p in enumerate(parts):
            d = self._desc.parts[i]
            d.type, d.layout, d.n, d.w = p.qtype, p.layout, p.shape[0], p.data.data_ptr()
        self._ptr = ctypes.addressof(self._desc)
        self.ptr = self._ptr  # the kernels' descriptor of this weight (ll_weight *)
        self._scratch_per_row = self.lib.ll_scratch_bytes(self._ptr, 1)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) + (0 if self.bias is None else self.bias.nbytes)

    @property
    def types(self) -> str:
        return "+".join(p.type_name for p in self.parts)

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,
        eps: float = 0.0,
        swiglu: bool = False,
        add_to: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [..., in] float32 -> [..., out]. `norm`: RMSNorm x with this weight (and eps) first. `swiglu`: x is
        [..., 2 * in] = [gate | up] and silu(gate) * up is the input. `add_to` [..., out] (float32, contiguous):
        the result is added into it, and it is returned."""
        k = self.in_features
        width = 2 * k if swiglu else k
        if x.shape[-1] != width:
            raise ValueError(f"input of width {x.shape[-1]} for a quantized linear taking {width}")
        x2 = x.reshape(-1, width)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        rows = x2.shape[0]
        if add_to is not None:
            out = add_to
            if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != rows * self.out_features:
                raise ValueError("add_to must be a contiguous float32 tensor of the output's shape")
        else:
            out = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.float32)
        if rows >= TILE_MIN_ROWS and not self.interleaved:
            self._tiled(x2, out.view(rows, self.out_features), norm, eps, swiglu, add_to is not None)
        else:
            pre = PRE_RMSNORM if norm is not None else (PRE_SWIGLU if swiglu else PRE_NONE)
            scratch = _buffer("kernels", self._scratch_per_row * rows + 64)
            self.lib.ll_linear(
                self._ptr,
                x2.data_ptr(),
                width,
                rows,
                out.data_ptr(),
                self.out_features,
                pre,
                None if norm is None else norm.data_ptr(),
                eps,
                1 if add_to is not None else 0,
                scratch.data_ptr(),
                torch.get_num_threads(),
            )
        if self.bias is not None:
            out.add_(self.bias)
        return out

    def _tiled(
        self, x2: torch.Tensor, out: torch.Tensor, norm: torch.Tensor | None, eps: float, swiglu: bool, add: bool
    ) -> None:
        k = self.in_features
        if norm is not None:
            x2 = F.rms_norm(x2, (k,), norm, eps)
        elif swiglu:
            gate, up = x2.split(k, dim=1)
            x2 = F.silu(gate) * up
        rows = x2.shape[0]
        tile_rows = max(16, TILE_FLOATS // k)
        tile = _buffer("tile", 4 * tile_rows * k).view(torch.float32)[: tile_rows * k].view(tile_rows, k)
        y_t = torch.empty(self.out_features, rows, dtype=torch.float32)  # [out, rows]: tiles write whole rows
        col = 0
        for p in self.parts:
            for r0 in range(0, p.shape[0], tile_rows):
                n = min(tile_rows, p.shape[0] - r0)
                self.lib.ll_dequant(
                    p.qtype, p.layout, p.data.data_ptr(), r0, n, k, tile.data_ptr(), torch.get_num_threads()
                )
                torch.mm(tile[:n], x2.t(), out=y_t[col + r0 : col + r0 + n])
            col += p.shape[0]
        if add:
            out.add_(y_t.t())
        else:
            out.copy_(y_t.t())


class QuantEmbedding:
    """Rows of a quantized [vocab, hidden] table looked up by token id, decoded to float32."""

    def __init__(self, table: QTensor) -> None:
        self.lib = kernels()
        self.table = table

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        hidden = self.table.shape[1]
        out = torch.empty(flat.numel(), hidden, dtype=torch.float32)
        t = self.table
        self.lib.ll_gather(t.qtype, t.layout, t.data.data_ptr(), hidden, flat.data_ptr(), flat.numel(), out.data_ptr())
        return out.view(*ids.shape, hidden)
