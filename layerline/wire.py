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

from layerline.errors import BadInputError
from layerline.v1 import tensor_pb2
from layerline.wire_format import MAX_DIM, MAX_DIMS, checked_shape, int64_column

__all__ = ["FROM_WIRE", "MAX_DIM", "MAX_DIMS", "TO_WIRE", "WIRE_DTYPES", "decode", "encode", "int64_column"]

TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.FLOAT32,
    torch.float16: tensor_pb2.FLOAT16,
    torch.bfloat16: tensor_pb2.BFLOAT16,
    torch.int64: tensor_pb2.INT64,
    torch.int32: tensor_pb2.INT32,
    torch.int8: tensor_pb2.INT8_ROWS,  # floats sent as int8 with a scale per row (`encode(t, torch.int8)`)
}
FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in TO_WIRE.items()}
# dtypes of hidden states on the wire; "int8": a float32 scale per token and int8 values (about a quarter of
# float32's bytes), for slow links
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
# decoded tensors share the message's immutable bytes and are only ever read; torch warns on every such view (and a
# warnings.catch_warnings() per message costs more than the decode), so that one warning is silenced here, for this
# module only
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning, module=__name__)


def encode(t: torch.Tensor, dtype: torch.dtype | None = None) -> tensor_pb2.Tensor:
    """A tensor as a wire message, cast to `dtype` first when given (`torch.int8` for a float tensor: int8 values
    with one scale per row of its last dimension, the largest magnitude of the row mapping to 127)."""
    if dtype == torch.int8 and t.is_floating_point():
        return _encode_int8_rows(t)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.dtype not in TO_WIRE or t.dtype == torch.int8:  # int8 rows are made from floats only
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
    if msg.dtype == tensor_pb2.INT8_ROWS:  # back to float32 (a new tensor)
        if count == 0:
            return torch.empty(shape, dtype=torch.float32)
        rows = count // shape[-1]
        scales = torch.frombuffer(msg.data, dtype=torch.float32, count=rows)
        q = torch.frombuffer(msg.data, dtype=torch.int8, offset=4 * rows).view(rows, shape[-1])
        if not torch.isfinite(scales).all():
            raise BadInputError(f"{field}: a row scale is not a finite number")
        return (q.to(torch.float32) * scales[:, None]).view(shape)
    dtype = FROM_WIRE[msg.dtype]
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(msg.data, dtype=dtype).view(shape)


def _encode_int8_rows(t: torch.Tensor) -> tensor_pb2.Tensor:
    shape = list(t.shape)
    if not shape:
        raise ValueError("int8 rows need at least one dimension")
    x = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1, shape[-1]) if t.numel() else None
    if x is None:
        return tensor_pb2.Tensor(dtype=tensor_pb2.INT8_ROWS, shape=shape, data=b"")
    scale = x.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, q = 0
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.INT8_ROWS, shape=shape, data=scale.numpy().tobytes() + q.numpy().tobytes()
    )
