"""Attention of a decode step through the kernels (`ll_attend_decode`): one new position per row, with the rotary
embedding, the write into the KV cache and softmax(q k) v done in one call per layer.

Why not torch's scaled_dot_product_attention: its CPU kernel splits the keys of a one-query step across threads
once there are a few dozen of them, so its rounding depends on the thread count; on quantized weights, whose 8-bit
activations turn a last-bit difference into a different rounding now and then, that would let a replica with
another thread count generate other tokens than the stage it replaces. Here every (row, KV head) is one task with
sums in a fixed order. It also replaces some eight torch calls per layer with one.

`DecodeSlots.of` says where each row writes and what it sees, once per forward; None when the step is not one
this kernel takes (more than one column, a padding row, a float16 cache...), and the layer then uses torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerline.kv_cache import ForwardPlan, KVCache
from layerline.quant.build import kernels

MAX_HEAD_DIM = 512  # the kernel keeps one rotated query head on its stack


@dataclass(frozen=True)
class DecodeSlots:
    rows: torch.Tensor  # [B] int64: each batch row's cache row
    pos: torch.Tensor  # [B] int64: the slot (= position) it writes
    first: dict[int | None, torch.Tensor]  # window -> [B] int64: the first slot it attends to

    @staticmethod
    def of(plan: ForwardPlan, cache: KVCache | None, head_dim: int) -> DecodeSlots | None:
        if cache is None or plan.width != 1 or head_dim > MAX_HEAD_DIM or cache.k.dtype != torch.float32:
            return None
        if cache.k.device.type != "cpu":
            return None
        pos = [n - 1 for n in plan.new_lengths]
        if any(cache.lengths[r] != p for r, p in zip(plan.cache_rows, pos, strict=True)):
            return None  # a padding row (it adds no position)
        first = {w: torch.tensor([0 if w is None else max(0, p - w + 1) for p in pos]) for w in plan.masks}
        return DecodeSlots(torch.tensor(plan.cache_rows), torch.tensor(pos), first)


def attend_decode(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    layer: int,
    slots: DecodeSlots,
    window: int | None,
) -> torch.Tensor:
    """qkv [B, 1, (H + 2 Hkv) * D] (float32) -> attention output [B, 1, H * D]; k and v go into the cache."""
    B = qkv.shape[0]
    qkv = qkv.reshape(B, -1).contiguous()
    cos, sin = cos.reshape(B, head_dim).contiguous(), sin.reshape(B, head_dim).contiguous()
    kc, vc = cache._layer_k[layer], cache._layer_v[layer]  # [R, Hkv, S_max, D], contiguous views
    out = torch.empty(B, 1, heads * head_dim)
    kernels().ll_attend_decode(
        qkv.data_ptr(),
        qkv.shape[1],
        B,
        heads,
        kv_heads,
        head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        kc.data_ptr(),
        vc.data_ptr(),
        cache.max_len,
        slots.rows.data_ptr(),
        slots.pos.data_ptr(),
        slots.first[window].data_ptr(),
        head_dim**-0.5,
        out.data_ptr(),
    )
    return out
