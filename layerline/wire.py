"""Tensors on the wire: torch tensors to `layerline.v1.Tensor` messages (raw little-endian bytes, dtype, shape)
and back, with every field of an incoming message checked before it is trusted.

Decoding shares the message's bytes (no copy) and casts only when the receiver computes in another dtype. The
checks, and the torch-free encoders the client uses, are in `wire_format`. Nothing is pickled. Errors are
`BadInputError`s naming the field, which servers turn into INVALID_ARGUMENT. This module knows nothing of
sessions or models.
"""

from __future__ import annotations

import warnings

import torch

from layerline.v1 import tensor_pb2
from layerline.wire_format import MAX_DIM, MAX_DIMS, checked_shape, int64_column

__all__ = ["FROM_WIRE", "MAX_DIM", "MAX_DIMS", "TO_WIRE", "WIRE_DTYPES", "decode", "encode", "int64_column"]

TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.FLOAT32,
    torch.float16: tensor_pb2.FLOAT16,
    torch.bfloat16: tensor_pb2.BFLOAT16,
    torch.int64: tensor_pb2.INT64,
    torch.int32: tensor_pb2.INT32,
}
FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in TO_WIRE.items()}
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# decoded tensors share the message's immutable bytes and are only ever read; torch warns on every such view (and a
# warnings.catch_warnings() per message costs more than the decode), so that one warning is silenced here, for this
# module only
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning, module=__name__)


def encode(t: torch.Tensor, dtype: torch.dtype | None = None) -> tensor_pb2.Tensor:
    """A tensor as a wire message, cast to `dtype` first when given."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.dtype not in TO_WIRE:
        raise ValueError(f"dtype {t.dtype} cannot go on the wire")
    if t.device.type != "cpu" or t.requires_grad or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: go through the bytes
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    else:
        data = t.numpy().tobytes()
    return tensor_pb2.Tensor(dtype=TO_WIRE[t.dtype], shape=list(t.shape), data=data)


def decode(
    msg: tensor_pb2.Tensor,
    field: str,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    ndim: int | None = None,
    max_elements: int | None = None,
) -> torch.Tensor:
    """A checked wire message (`wire_format.checked_shape`) as a (read-only) tensor sharing the message's bytes."""
    codes = None if dtypes is None else [TO_WIRE[d] for d in dtypes]
    shape, count = checked_shape(msg, field, codes=codes, ndim=ndim, max_elements=max_elements)
    dtype = FROM_WIRE[msg.dtype]
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(msg.data, dtype=dtype).view(shape)
