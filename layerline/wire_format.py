"""The wire format of `layerline.v1.Tensor` (raw little-endian bytes, a dtype code, a shape), without torch: the
checks every incoming message passes before it is trusted, and plain-list encoders and decoders for the client SDK
(token ids, positions, log-probabilities). `layerline.wire` builds torch tensors on these same checks. Errors are
`BadInputError`s naming the field (servers turn them into INVALID_ARGUMENT)."""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence

from layerline.errors import BadInputError
from layerline.v1 import tensor_pb2

if sys.byteorder != "little":  # the wire is little-endian and decoding does not swap
    raise ImportError("layerline's wire codec needs a little-endian host")

NAMES: dict[int, str] = {
    tensor_pb2.FLOAT32: "float32",
    tensor_pb2.FLOAT16: "float16",
    tensor_pb2.BFLOAT16: "bfloat16",
    tensor_pb2.INT64: "int64",
    tensor_pb2.INT32: "int32",
    tensor_pb2.INT8_ROWS: "int8 rows",
}
ITEMSIZE: dict[int, int] = {
    tensor_pb2.FLOAT32: 4,
    tensor_pb2.FLOAT16: 2,
    tensor_pb2.BFLOAT16: 2,
    tensor_pb2.INT64: 8,
    tensor_pb2.INT32: 4,
    tensor_pb2.INT8_ROWS: 1,  # and a float32 scale per row (`data_bytes`)
}
MAX_DIMS = 4
MAX_DIM = 1 << 31  # per dimension; also keeps zero-element shapes with huge other dims out of torch's layout maths


def checked_shape(
    msg: tensor_pb2.Tensor,
    field: str,
    *,
    codes: Sequence[int] | None = None,
    ndim: int | None = None,
    max_elements: int | None = None,
) -> tuple[tuple[int, ...], int]:
    """The message's shape and element count, once its dtype (one of `codes`, when given), its shape and the length
    of its data agree."""
    if msg.dtype not in NAMES:
        raise BadInputError(f"{field}: unknown or unset dtype {msg.dtype}")
    name = NAMES[msg.dtype]
    if codes is not None and msg.dtype not in codes:
        raise BadInputError(f"{field}: dtype {name} is not allowed here ({', '.join(NAMES[c] for c in codes)})")
    shape = tuple(msg.shape)  # protobuf ints
    if ndim is not None and len(shape) != ndim:
        raise BadInputError(f"{field}: expected {ndim} dimensions, got shape {list(shape)}")
    if len(shape) > MAX_DIMS or (shape and (min(shape) < 0 or max(shape) > MAX_DIM)):
        raise BadInputError(f"{field}: invalid shape {list(shape)} (at most {MAX_DIMS} dims of 0..{MAX_DIM})")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise BadInputError(f"{field}: {count} elements is more than the {max_elements} allowed")
    if msg.dtype == tensor_pb2.INT8_ROWS and not shape:
        raise BadInputError(f"{field}: {name} needs at least one dimension")
    expected = data_bytes(msg.dtype, shape)
    if len(msg.data) != expected:
        raise BadInputError(
            f"{field}: {len(msg.data)} bytes of data for shape {list(shape)} of {name} (expected {expected})"
        )
    return shape, count


def data_bytes(dtype: int, shape: Sequence[int]) -> int:
    """Bytes of data a message of that dtype and shape carries."""
    count = math.prod(shape)
    if dtype == tensor_pb2.INT8_ROWS:
        return count + 4 * (count // shape[-1] if shape[-1] else 0)
    return count * ITEMSIZE[dtype]


def int64_rows(rows: Sequence[Sequence[int]]) -> tensor_pb2.Tensor:
    """Equal-length rows of ints as a [B, T] int64 message."""
    flat = [v for r in rows for v in r]
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.INT64, shape=[len(rows), len(rows[0])], data=struct.pack(f"<{len(flat)}q", *flat)
    )


def int64_column(values: Sequence[int]) -> tensor_pb2.Tensor:
    """Plain ints as a [len(values), 1] int64 message (one token or position per row)."""
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.INT64, shape=[len(values), 1], data=struct.pack(f"<{len(values)}q", *values)
    )


def flat_values(msg: tensor_pb2.Tensor, field: str, code: int, shape: Sequence[int]) -> list:
    """The values of a float32 or int64 message of exactly `shape`, flat, as Python floats or ints."""
    got, count = checked_shape(msg, field, codes=(code,), ndim=len(shape))
    if got != tuple(shape):
        raise BadInputError(f"{field}: shape {list(got)}, expected {list(shape)}")
    return list(struct.unpack(f"<{count}{'f' if code == tensor_pb2.FLOAT32 else 'q'}", msg.data))


def float32_rows(msg: tensor_pb2.Tensor, field: str, shape: tuple[int, int]) -> list[list[float]]:
    """A [B, T] float32 message of exactly `shape` as lists of floats."""
    got, count = checked_shape(msg, field, codes=(tensor_pb2.FLOAT32,), ndim=2)
    if got != tuple(shape):
        raise BadInputError(f"{field}: shape {list(got)}, expected {list(shape)}")
    flat = struct.unpack(f"<{count}f", msg.data)
    T = shape[1]
    return [list(flat[b * T : (b + 1) * T]) for b in range(shape[0])]
