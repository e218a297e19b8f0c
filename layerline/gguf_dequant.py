"""Dequantizing GGUF tensor data into torch tensors with vectorized torch ops.

`dequantize` takes one tensor's stored data exactly as the `gguf` package's reader exposes it (a possibly read-only
numpy view into the memory-mapped file), checks its size against the logical shape, and returns a new float tensor.
It handles the plain float types (F32, F16, BF16), the legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the
k-quants (Q2_K..Q6_K); every other GGML type (IQ*, TQ*, MXFP4, integer types...) raises `UnsupportedModelError`.
The block layouts follow ggml's `ggml-quants.c`, and the arithmetic is done in float32 in the same order as the
`gguf` package's numpy reference, so results match it bit for bit before the final cast to the requested dtype.
Large tensors are processed in chunks of blocks so that only a few float32 temporaries of bounded size exist at once.
This module knows nothing of files or model architectures (see `gguf_file.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from layerline.errors import CheckpointError, UnsupportedModelError
from layerline.ggml_types import type_name

__all__ = ["SUPPORTED_QTYPES", "dequantize", "is_supported", "qtype_name"]

# gguf.GGMLQuantizationType values of the types handled here (hard-coded so importing this module stays cheap).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30

SUPPORTED_QTYPES: dict[int, str] = {
    F32: "F32",
    F16: "F16",
    BF16: "BF16",
    Q4_0: "Q4_0",
    Q4_1: "Q4_1",
    Q5_0: "Q5_0",
    Q5_1: "Q5_1",
    Q8_0: "Q8_0",
    Q2_K: "Q2_K",
    Q3_K: "Q3_K",
    Q4_K: "Q4_K",
    Q5_K: "Q5_K",
    Q6_K: "Q6_K",
}

QK_K = 256  # elements per k-quant super-block

# (elements per block, bytes per block), as in gguf.GGML_QUANT_SIZES
_BLOCK: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 2 + 16),
    Q4_1: (32, 2 + 2 + 16),
    Q5_0: (32, 2 + 4 + 16),
    Q5_1: (32, 2 + 2 + 4 + 16),
    Q8_0: (32, 2 + 32),
    Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}

_STORED_DTYPE: dict[int, torch.dtype] = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}

# Output elements decoded per chunk: big enough to amortize per-op overhead and keep the intra-op thread pool busy,
# small enough that a chunk's temporaries stay bounded (4 MiB per float32 temporary) whatever the tensor's size.
_CHUNK_ELEMENTS = 1 << 20

# byte value -> its 8 bits as 8 bytes of 0/1 (bit i in byte i), packed in an int64 (little-endian)
_BITS = ((torch.arange(256).view(256, 1) >> torch.arange(8)) & 1).to(torch.uint8).view(torch.int64).view(256)


def qtype_name(qtype: int) -> str:
    """The GGML name of a tensor type value ("Q4_K", "IQ2_XS"...), or "type #N" for a value GGML does not know."""
    return type_name(qtype)


def is_supported(qtype: int) -> bool:
    """Whether `dequantize` handles this gguf.GGMLQuantizationType value."""
    return int(qtype) in SUPPORTED_QTYPES


# --- helpers --------------------------------------------------------------------------------------------------------
# Torch elementwise ops are fast on long contiguous runs but pay a few ns per row on views made of many short rows,
# and shifts by a *tensor* of amounts are not vectorized. So the kernels do their byte arithmetic with scalar operands
# on whole contiguous blocks (headers included) or on bytes packed into int32/int64 words (SWAR), pick the wanted
# bytes out with as few strided copies as they can, and apply the scales in place on the float32 output.


def _f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 field at (even) byte `offset` of every block, as float32 of shape (n_blocks, 1)."""
    return b.view(torch.float16)[:, offset // 2].to(torch.float32).unsqueeze(1)


def _packed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous copy of the (n, k) byte view x, reinterpreted as (n, k / size) words of `dtype`."""
    return torch.empty(x.shape, dtype=torch.uint8).copy_(x).view(dtype)


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """x shifted left by k bits (right by -k when k < 0)."""
    return x << k if k > 0 else x >> -k if k < 0 else x


def _or_field(q: torch.Tensor, x: torch.Tensor, bit: int, width: int, to: int) -> None:
    """For int64 words of 8 packed bytes: q |= bits bit..bit+width-1 of each byte of x, moved to bits to..to+width-1.

    Only whole-byte fields are masked in, so the sign bits an arithmetic right shift brings in never get through.
    """
    mask = ((1 << width) - 1) << to
    mask64 = int.from_bytes(bytes([mask] * 8), "little", signed=True)
    q.bitwise_or_(_shift(x, to - bit) & mask64)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: d * scale and dmin * min of the eight 32-element sub-blocks, each float32 (n, 8, 1).

    The 12 bytes at 4..15 pack eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4); they are unpacked
    four at a time from int32 words d (bytes 4-7), m (8-11) and md (12-15).
    """
    n = b.shape[0]
    w = b.view(torch.int32)
    d, m, md = w[:, 1], w[:, 2], w[:, 3]
    sc = torch.empty((n, 2), dtype=torch.int32)
    mn = torch.empty((n, 2), dtype=torch.int32)
    torch.bitwise_and(d, 0x3F3F3F3F, out=sc[:, 0])
    torch.bitwise_or(md & 0x0F0F0F0F, (d >> 2) & 0x30303030, out=sc[:, 1])
    torch.bitwise_and(m, 0x3F3F3F3F, out=mn[:, 0])
    torch.bitwise_or((md >> 4) & 0x0F0F0F0F, (m >> 2) & 0x30303030, out=mn[:, 1])
    ds = _f16(b, 0) * sc.view(torch.uint8).to(torch.float32)
    dm = _f16(b, 2) * mn.view(torch.uint8).to(torch.float32)
    return ds.unsqueeze(-1), dm.unsqueeze(-1)


# --- per-type kernels: uint8 blocks (n, bytes per block), contiguous -> float32 out (n, elements per block) ----------
# Each follows the operation order of gguf.quants (float32 throughout) so the results are bit-identical to it:
# the quants are small integers (exact in float32), multiplied by the same float32 scale, then offset.


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    o = out.view(n, 2, 16)  # byte j: low nibble -> element j, high nibble -> element 16 + j
    o[:, 0].copy_((b & 0x0F).view(torch.int8).sub_(8)[:, 2:])
    o[:, 1].copy_((b >> 4).view(torch.int8).sub_(8)[:, 2:])
    out.mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    o = out.view(n, 2, 16)
    o[:, 0].copy_((b & 0x0F)[:, 4:])
    o[:, 1].copy_((b >> 4)[:, 4:])
    out.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5(b: torch.Tensor, qh: int) -> torch.Tensor:
    """Q5_0 / Q5_1: the 5-bit quants (n, 32): 4 bytes of fifth bits at `qh` (bit j for element j), then nibbles."""
    n = b.shape[0]
    bits = _BITS.index_select(0, b[:, qh : qh + 4].to(torch.int32).view(-1)).view(torch.uint8).view(n, 32)
    q = torch.empty((n, 2, 16), dtype=torch.uint8)
    q[:, 0].copy_((b & 0x0F)[:, qh + 4 :])
    q[:, 1].copy_((b >> 4)[:, qh + 4 :])
    return q.view(n, 32).bitwise_or_(bits.bitwise_left_shift_(4))


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_q5(b, 2).view(torch.int8).sub_(16))
    out.mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_q5(b, 4))
    out.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:].view(torch.int8))
    out.mul_(_f16(b, 0))


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scales = b[:, :16]  # per 16-element sub-block: scale in the low nibble, min in the high nibble
    dl = _f16(b, 80) * (scales & 0x0F).to(torch.float32)
    ml = _f16(b, 82) * (scales >> 4).to(torch.float32)
    o = out.view(n, 2, 4, 32)  # bits 2s..2s+1 of byte j of 32-byte half h (bytes 16-79) -> element 128h + 32s + j
    for s in range(4):
        o[:, :, s].copy_(((b >> (2 * s)) & 0x03)[:, 16:80].view(n, 2, 32))
    o = out.view(n, 16, 16)
    o.mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1))


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    # sixteen 6-bit scales (bytes 96-107): low 4 bits from bytes 96-103 (all low nibbles, then all high nibbles), top 2
    # bits from bytes 104-107 (scale j: bits 2(j // 4).. of byte j % 4). Unpacked four at a time from int32 words.
    w = _packed(b[:, 96:108], torch.int32)
    lo, mid, hi = w[:, 0], w[:, 1], w[:, 2]
    sc = torch.empty((n, 4), dtype=torch.int32)
    torch.bitwise_or(lo & 0x0F0F0F0F, (hi << 4) & 0x30303030, out=sc[:, 0])
    torch.bitwise_or(mid & 0x0F0F0F0F, (hi << 2) & 0x30303030, out=sc[:, 1])
    torch.bitwise_or((lo >> 4) & 0x0F0F0F0F, hi & 0x30303030, out=sc[:, 2])
    torch.bitwise_or((mid >> 4) & 0x0F0F0F0F, (hi >> 2) & 0x30303030, out=sc[:, 3])
    dl = _f16(b, 108) * (sc.view(torch.int8) - 32).to(torch.float32)
    q = torch.empty((n, 2, 4, 32), dtype=torch.uint8)  # low 2 bits: as in Q2_K, from bytes 32-95
    for s in range(4):
        q[:, :, s].copy_(((b >> (2 * s)) & 0x03)[:, 32:96].view(n, 2, 32))
    # third bit: bit i of byte j of hmask (bytes 0-31) -> element 32i + j; a *clear* bit means minus 4
    q64 = q.view(n, 256).view(torch.int64).view(n, 8, 4)
    hm = _packed(b[:, :32], torch.int64)
    for i in range(8):
        _or_field(q64[:, i], hm, i, 1, 2)
    o = out.view(n, 16, 16)
    o.copy_(q.view(torch.int8).view(n, 16, 16).sub_(4))
    o.mul_(dl.unsqueeze(-1))


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    ds, dm = _k_scales(b)
    o = out.view(n, 4, 2, 32)  # byte j of 32-byte chunk c (bytes 16-143): low nibble -> 64c + j, high -> 64c + 32 + j
    o[:, :, 0].copy_((b & 0x0F)[:, 16:].view(n, 4, 32))
    o[:, :, 1].copy_((b >> 4)[:, 16:].view(n, 4, 32))
    out.view(n, 8, 32).mul_(ds).sub_(dm)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    ds, dm = _k_scales(b)
    q = torch.empty((n, 4, 2, 32), dtype=torch.uint8)  # low 4 bits: as in Q4_K, from bytes 48-175
    q[:, :, 0].copy_((b & 0x0F)[:, 48:].view(n, 4, 32))
    q[:, :, 1].copy_((b >> 4)[:, 48:].view(n, 4, 32))
    q64 = q.view(n, 256).view(torch.int64).view(n, 8, 4)  # fifth bit: bit i of byte j of qh (16-47) -> 32i + j
    qh = _packed(b[:, 16:48], torch.int64)
    for i in range(8):
        _or_field(q64[:, i], qh, i, 1, 4)
    o = out.view(n, 8, 32)
    o.copy_(q.view(n, 8, 32))
    o.mul_(ds).sub_(dm)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    ds = _f16(b, 208) * b[:, 192:208].view(torch.int8).to(torch.float32)  # 16 int8 scales
    q = torch.empty((n, 2, 2, 64), dtype=torch.uint8)  # byte j of 64-byte half h of ql: nibbles -> 128h + j, +64
    q[:, :, 0].copy_((b & 0x0F)[:, :128].view(n, 2, 64))
    q[:, :, 1].copy_((b >> 4)[:, :128].view(n, 2, 64))
    # top 2 bits: bits 2s..2s+1 of byte j of 32-byte half h of qh (bytes 128-191) -> element 128h + 32s + j
    q64 = q.view(n, 256).view(torch.int64).view(n, 2, 4, 4)
    qh = _packed(b[:, 128:192], torch.int64).view(n, 2, 4)
    for s in range(4):
        _or_field(q64[:, :, s], qh, 2 * s, 2, 4)
    o = out.view(n, 16, 16)
    o.copy_(q.view(torch.int8).view(n, 16, 16).sub_(32))
    o.mul_(ds.unsqueeze(-1))


_KERNELS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    Q4_0: _q4_0,
    Q4_1: _q4_1,
    Q5_0: _q5_0,
    Q5_1: _q5_1,
    Q8_0: _q8_0,
    Q2_K: _q2_k,
    Q3_K: _q3_k,
    Q4_K: _q4_k,
    Q5_K: _q5_k,
    Q6_K: _q6_k,
}


def _bytes_of(raw: np.ndarray, name: str) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy array, a view where possible (never written to)."""
    arr = np.asarray(raw)
    if arr.dtype.byteorder == ">":  # a big-endian GGUF file; the reader does not byte-swap tensor data
        raise UnsupportedModelError(f"GGUF tensor {name}: big-endian tensor data is not supported")
    arr = np.ascontiguousarray(arr)  # no copy for the reader's (contiguous) views
    return arr.reshape(-1).view(np.uint8)


def _to_torch(chunk: np.ndarray) -> torch.Tensor:
    """Copy a slice of the (possibly read-only, memory-mapped) source into a fresh, writable torch tensor."""
    return torch.from_numpy(np.array(chunk, dtype=np.uint8, copy=True))


def dequantize(
    raw: np.ndarray,
    qtype: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    name: str = "",
) -> torch.Tensor:
    """Decode one GGUF tensor's stored data into a new tensor of `shape` and `dtype`.

    `raw` is the data as `gguf.GGUFReader` exposes it (`ReaderTensor.data`): for block types a uint8 array of shape
    (rows, bytes per row), for F32/F16 an array of those elements, for BF16 uint8 bytes; only its bytes matter, and it
    is never written to. `qtype` is a `gguf.GGMLQuantizationType` value and `shape` the logical shape in torch order
    (rows first, GGUF's ne reversed). Decoding happens in float32; the result is cast to `dtype` at the end.
    `name` only labels error messages.

    Raises UnsupportedModelError for a tensor type not handled here, and CheckpointError when the data's size does not
    match the shape (or the row length is not a whole number of blocks).
    """
    label = f"GGUF tensor {name!r}" if name else "GGUF tensor"
    qtype = int(qtype)
    if qtype not in SUPPORTED_QTYPES:
        supported = ", ".join(SUPPORTED_QTYPES.values())
        raise UnsupportedModelError(
            f"{label} has type {qtype_name(qtype)}, which is not supported (supported: {supported})"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dequantize needs a floating-point dtype, got {dtype}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise CheckpointError(f"{label} has a negative dimension in shape {shape}")
    n_elements = int(np.prod(shape, dtype=np.int64))
    block_size, type_size = _BLOCK[qtype]
    row = shape[-1] if shape else 1
    if row % block_size:
        raise CheckpointError(
            f"{label} of type {SUPPORTED_QTYPES[qtype]} has rows of {row} elements, "
            f"not a multiple of its block size {block_size}"
        )
    data = _bytes_of(raw, label)
    n_blocks = n_elements // block_size
    expected = n_blocks * type_size
    if data.nbytes != expected:
        raise CheckpointError(
            f"{label} of type {SUPPORTED_QTYPES[qtype]} and shape {shape} should hold {expected} bytes, "
            f"got {data.nbytes}"
        )

    stored = _STORED_DTYPE.get(qtype)
    if stored is not None:  # plain floats: one copy out of the memory map, then (if needed) one conversion
        if stored == dtype or n_elements <= _CHUNK_ELEMENTS:
            return _to_torch(data).view(stored).to(dtype).reshape(shape)
        out = torch.empty(n_elements, dtype=dtype)
        for start in range(0, n_elements, _CHUNK_ELEMENTS):
            stop = min(start + _CHUNK_ELEMENTS, n_elements)
            out[start:stop].copy_(_to_torch(data[start * type_size : stop * type_size]).view(stored))
        return out.reshape(shape)

    # block types: decode a chunk of blocks at a time, in place in the output (or in a float32 scratch chunk that is
    # then cast into it, so that every intermediate stays float32 whatever the output dtype)
    kernel = _KERNELS[qtype]
    out = torch.empty((n_blocks, block_size), dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    scratch = None if dtype == torch.float32 else torch.empty((min(step, n_blocks), block_size), dtype=torch.float32)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        blocks = _to_torch(data[start * type_size : stop * type_size]).view(stop - start, type_size)
        if scratch is None:
            kernel(blocks, out[start:stop])
        else:
            kernel(blocks, scratch[: stop - start])
            out[start:stop].copy_(scratch[: stop - start])
    return out.reshape(shape)
