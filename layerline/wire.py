"""Tensors on the wire: torch tensors to `layerline.v1.Tensor` messages (raw little-endian bytes, dtype, shape)
and back, with every field of an incoming message checked before it is trusted.

Decoding shares the message's bytes (no copy) and casts only when the receiver computes in another dtype.
Nothing is pickled. Errors are `BadInputError`s naming the field, which servers turn into INVALID_ARGUMENT.
This module knows nothing of sessions or models.
"""

from __future__ import annotations

import math
import struct
import sys
import warnings

import torch

from layerline.errors import BadInputError
from layerline.v1 import tensor_pb2

if sys.byteorder != "little":  # the wire is little-endian and decoding does not swap
    raise ImportError("layerline's wire codec needs a little-endian host")

TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.FLOAT32,
    torch.float16: tensor_pb2.FLOAT16,
    torch.bfloat16: tensor_pb2.BFLOAT16,
    torch.int64: tensor_pb2.INT64,
    torch.int32: tensor_pb2.INT32,
}
FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in TO_WIRE.items()}
ITEMSIZE: dict[torch.dtype, int] = {d: torch.empty((), dtype=d).element_size() for d in TO_WIRE}
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# decoded tensors share the message's immutable bytes and are only ever read; torch warns on every such view (and a
# warnings.catch_warnings() per message costs more than the decode), so that one warning is silenced here, for this
# module only
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning, module=__name__)

MAX_DIMS = 4
MAX_DIM = 1 << 31  # per dimension; also keeps zero-element shapes with huge other dims out of torch's layout maths


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


def int64_column(values: list[int]) -> tensor_pb2.Tensor:
    """Plain ints as a [len(values), 1] int64 message (one token or position per row), without torch."""
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.INT64, shape=[len(values), 1], data=struct.pack(f"<{len(values)}q", *values)
    )


def decode(
    msg: tensor_pb2.Tensor,
    field: str,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    ndim: int | None = None,
    max_elements: int | None = None,
) -> torch.Tensor:
    """A checked wire message as a (read-only) tensor sharing the message's bytes."""
    if msg.dtype not in FROM_WIRE:
        raise BadInputError(f"{field}: unknown or unset dtype {msg.dtype}")
    dtype = FROM_WIRE[msg.dtype]
    if dtypes is not None and dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise BadInputError(f"{field}: dtype {str(dtype).removeprefix('torch.')} is not allowed here ({allowed})")
    shape = tuple(msg.shape)  # protobuf ints
    if ndim is not None and len(shape) != ndim:
        raise BadInputError(f"{field}: expected {ndim} dimensions, got shape {list(shape)}")
    if len(shape) > MAX_DIMS or (shape and (min(shape) < 0 or max(shape) > MAX_DIM)):
        raise BadInputError(f"{field}: invalid shape {list(shape)} (at most {MAX_DIMS} dims of 0..{MAX_DIM})")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise BadInputError(f"{field}: {count} elements is more than the {max_elements} allowed")
    itemsize = ITEMSIZE[dtype]
    if len(msg.data) != count * itemsize:
        raise BadInputError(
            f"{field}: {len(msg.data)} bytes of data for shape {list(shape)} of {str(dtype).removeprefix('torch.')} "
            f"(expected {count * itemsize})"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(msg.data, dtype=dtype).view(shape)
