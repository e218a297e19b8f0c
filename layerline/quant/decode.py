"""A decode step through all of a stage's quantized layers in one call to the kernels (`ll_decode_layers`): per
layer the q/k/v projection with its RMSNorm, rotary, the write into the KV cache, attention, the output projection
and its residual, the gate/up projection with its RMSNorm, SwiGLU, the down projection and its residual.

Why one call: at batch 1 a small model's layer is a few tens of microseconds of kernels, and driving it from
Python (five kernel calls, their arguments, the tensors in between) cost about as much again. The calls inside are
the ones the layer-by-layer path (`QuantBlock.step`) makes, in the same order, so the numbers are the same.

Why its own attention and not torch's scaled_dot_product_attention: that kernel splits the keys of a one-query
step across threads once there are a few dozen, so its rounding depends on the thread count; on 8-bit activations a
last-bit difference becomes a different rounding now and then, and a replica with another thread count would
generate other tokens than the stage it replaces. Here every (row, KV head) is one task summing in a fixed order.

`DecodeRows.of` says where each row of a step keeps its K/V (rows may be different sessions' caches, or the columns of
one session's speculative decoding step, each position then computed as the decode step it stands for would be), or
None when the step is not one this path takes (a prompt's columns, a padding row, an unusual cache), and the stage
then goes layer by layer.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import torch

from layerline.kv_cache import ForwardPlan, KVCache
from layerline.paged_kv import PagedCache
from layerline.quant.build import kernels

MAX_HEAD_DIM = 512  # the kernel keeps one rotated query head on its stack
# the most columns of a speculative step (the last token and up to 16 proposals), which goes this way to get the
# numbers of the decode steps it stands for (a prompt's columns go layer by layer, as they always have)
MAX_COLUMNS = 17


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("qkv", "o", "gate_up", "down", "attn_norm", "mlp_norm")),
        *((name, ctypes.c_void_p) for name in ("qkv_bias", "o_bias", "gate_up_bias", "down_bias")),
        ("window", ctypes.c_int64),
    ]


class _KVRow(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("layer_stride", "block_stride", "head_stride", "slot_stride")),
        ("block_size", ctypes.c_int64),
        ("table", ctypes.c_void_p),
        ("pos", ctypes.c_int64),
    ]


class DecodeRows:
    """Where each row of a decode step keeps its K/V, for `StageDecoder`."""

    def __init__(self, rows: list[tuple[KVCache | PagedCache, int, int]]) -> None:  # (cache, cache row, position)
        self.count = len(rows)
        self.array = (_KVRow * len(rows))()
        self.tables = []  # the block tables the array points into, alive as long as it is
        for slot, (cache, r, pos) in zip(self.array, rows, strict=True):
            k, v, ls, bs, hs, ss, size, table = cache.kv_row(r)
            slot.k, slot.v, slot.layer_stride, slot.block_stride = k, v, ls, bs
            slot.head_stride, slot.slot_stride, slot.block_size = hs, ss, size
            slot.table, slot.pos = table.data_ptr(), pos
            self.tables.append(table)

    @staticmethod
    def of(
        plans: Sequence[ForwardPlan],
        caches: Sequence[KVCache | PagedCache | None],
        head_dim: int,
        columns: bool = False,
    ) -> DecodeRows | None:
        """`columns`: a step of several columns stands for that many decode steps (speculative decoding) and goes
        this way too (one row of one session, at most MAX_COLUMNS); else only one-column steps do."""
        rows = []
        for plan, cache in zip(plans, caches, strict=True):
            if cache is None or plan.width > (MAX_COLUMNS if columns else 1) or head_dim > MAX_HEAD_DIM:
                return None
            if plan.width > 1 and (len(plans) > 1 or plan.batch > 1):
                return None
            store = cache.pool.k if isinstance(cache, PagedCache) else cache.k
            if store.dtype != torch.float32 or store.device.type != "cpu" or not store.is_contiguous():
                return None
            for r, n in zip(plan.cache_rows, plan.new_lengths, strict=True):
                if cache.lengths[r] != n - plan.width:
                    return None  # a padding row (it adds fewer positions)
                rows.extend((cache, r, p) for p in range(n - plan.width, n))
        return DecodeRows(rows)


_scratch = threading.local()


class StageDecoder:
    """The layers of a quantized stage as the kernels' layer descriptors (built once; the linears, norms and
    biases they point to stay owned by the blocks)."""

    def __init__(self, blocks: Sequence, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float):
        self.lib = kernels()
        self.blocks = list(blocks)  # keeps what the descriptors point to alive
        self.heads, self.kv_heads, self.head_dim, self.intermediate, self.eps = (
            heads,
            kv_heads,
            head_dim,
            intermediate,
            eps,
        )
        self.layers = (_Layer * len(self.blocks))()
        for d, b in zip(self.layers, self.blocks, strict=True):
            d.qkv, d.o, d.gate_up, d.down = b.qkv.ptr, b.o.ptr, b.gate_up.ptr, b.down.ptr
            d.attn_norm, d.mlp_norm = b.attn_norm.data_ptr(), b.mlp_norm.data_ptr()
            for name, lin in (("qkv_bias", b.qkv), ("o_bias", b.o), ("gate_up_bias", b.gate_up), ("down_bias", b.down)):
                setattr(d, name, None if lin.bias is None else lin.bias.data_ptr())
            d.window = b.window or 0

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: DecodeRows) -> None:
        """h [B, T, hidden] (float32, contiguous, the stage's own: updated in place), B * T = rows.count (T > 1:
        one row's columns); cos, sin: [B, ..., T, D] at each row's position."""
        B, D = rows.count, self.head_dim
        cos, sin = cos.reshape(B, D).contiguous(), sin.reshape(B, D).contiguous()
        need = self.lib.ll_decode_scratch_bytes(
            self.layers, len(self.blocks), B, self.heads, self.kv_heads, D, self.intermediate
        )
        scratch = getattr(_scratch, "buffer", None)
        if scratch is None or scratch.numel() < need:
            scratch = _scratch.buffer = torch.empty(need, dtype=torch.uint8)
        self.lib.ll_decode_layers(
            self.layers,
            len(self.blocks),
            h.data_ptr(),
            B,
            h.shape[-1],
            self.heads,
            self.kv_heads,
            D,
            self.intermediate,
            self.eps,
            cos.data_ptr(),
            sin.data_ptr(),
            rows.array,
            D**-0.5,
            scratch.data_ptr(),
            torch.get_num_threads(),
        )
