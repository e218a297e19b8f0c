"""The tensor wire codec: exact round trips for every wire dtype and shape, casts on encode, decoding without a
copy, and every malformed message (including fuzzed ones) refused with a `BadInputError` naming the field."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from layerline import wire
from layerline.errors import BadInputError
from layerline.v1 import tensor_pb2

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]
SHAPES = [(), (1,), (7,), (2, 3), (0,), (3, 0), (0, 4, 5), (2, 3, 4), (1, 2, 3, 4), (2, 0, 3, 1)]


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)


def message(dtype: int = tensor_pb2.FLOAT32, shape=(2, 3), data: bytes | None = None) -> tensor_pb2.Tensor:
    if data is None:
        data = bytes(4 * int(np.prod(shape)))
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def refused(msg, field: str = "step.hidden", **checks) -> str:
    with pytest.raises(BadInputError) as e:
        wire.decode(msg, field, **checks)
    assert field in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_exact(dtype, shape):
    t = sample(shape, dtype)
    msg = tensor_pb2.Tensor.FromString(wire.encode(t).SerializeToString())
    assert msg.dtype == wire.TO_WIRE[dtype]
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    back = wire.decode(msg, "x")
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_round_trip_keeps_special_floats():
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40])
    for dtype, bits in ((torch.float32, torch.int32), (torch.float16, torch.int16), (torch.bfloat16, torch.int16)):
        x = t.to(dtype)
        back = wire.decode(wire.encode(x), "x")
        assert torch.equal(back.view(bits), x.view(bits))  # bit for bit: NaN payload and the sign of zero included


def test_data_is_little_endian_row_major():
    msg = wire.encode(torch.tensor([[1, 2], [3, 258]], dtype=torch.int32))
    assert msg.data == b"".join(v.to_bytes(4, "little") for v in (1, 2, 3, 258))


def test_encode_takes_non_contiguous_and_grad_tensors():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view: not contiguous
    assert torch.equal(wire.decode(wire.encode(t), "x"), t)
    g = torch.ones(2, 2, requires_grad=True) * 3
    assert torch.equal(wire.decode(wire.encode(g), "x"), g.detach())


@pytest.mark.parametrize(
    "src, dst",
    [
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.int64, torch.int32),
    ],
    ids=str,
)
def test_encode_casts_to_the_requested_dtype(src, dst):
    t = sample((3, 5), torch.float32).to(src) if src.is_floating_point else torch.arange(15, dtype=src).view(3, 5)
    msg = wire.encode(t, dtype=dst)
    assert msg.dtype == wire.TO_WIRE[dst]
    assert len(msg.data) == 15 * torch.empty((), dtype=dst).element_size()
    assert torch.equal(wire.decode(msg, "x"), t.to(dst))


def test_encode_with_the_same_dtype_is_no_cast():
    t = sample((4,), torch.bfloat16)
    assert wire.encode(t, dtype=torch.bfloat16) == wire.encode(t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool, torch.uint8, torch.int8], ids=str)
def test_encode_refuses_dtypes_not_on_the_wire(dtype):
    with pytest.raises(ValueError, match="wire"):
        wire.encode(torch.zeros(2, dtype=dtype))


def test_decode_shares_the_bytes_it_is_given():
    """No copy: the tensor is a view of the message's `data` buffer (a stand-in message, so that the buffer object
    is known: a real protobuf message may hand out a fresh bytes object on each `.data` access)."""
    t = torch.arange(64, dtype=torch.float32)
    data = wire.encode(t).data
    msg = SimpleNamespace(dtype=tensor_pb2.FLOAT32, shape=[8, 8], data=data)
    back = wire.decode(msg, "x")
    assert back.data_ptr() == np.frombuffer(data, dtype=np.uint8).ctypes.data
    assert back.shape == (8, 8) and torch.equal(back.reshape(-1), t)


def test_decoded_tensor_outlives_the_message():
    msg = wire.encode(torch.arange(1000, dtype=torch.int64))
    back = wire.decode(msg, "x")
    del msg
    assert back.sum().item() == sum(range(1000))


@pytest.mark.parametrize("dtype", [tensor_pb2.DTYPE_UNSPECIFIED, 6, 99, 2**31 - 1, -1])
def test_unknown_or_unset_dtype(dtype):
    refused(message(dtype=dtype))


def test_unset_dtype_from_an_empty_message():
    refused(tensor_pb2.Tensor())


def test_dtype_outside_the_allowed_set():
    msg = wire.encode(torch.zeros(2, 3, dtype=torch.int64))
    text = refused(msg, dtypes=(torch.float32, torch.bfloat16))
    assert "int64" in text and "float32" in text and "bfloat16" in text
    assert wire.decode(msg, "x", dtypes=(torch.int64,)).dtype == torch.int64


@pytest.mark.parametrize("shape", [(), (6,), (1, 2, 3)])
def test_wrong_number_of_dims(shape):
    text = refused(wire.encode(torch.zeros(shape)), ndim=2)
    assert "2" in text
    assert wire.decode(wire.encode(torch.zeros(shape)), "x", ndim=len(shape)).shape == shape


@pytest.mark.parametrize("shape", [(-1,), (2, -3), (-2, -2), (0, -1), (-(2**63),)])
def test_negative_dim(shape):
    refused(message(shape=shape, data=b""))


def test_too_many_dims():
    shape = (1,) * (wire.MAX_DIMS + 1)
    refused(message(shape=shape, data=bytes(4)))
    assert wire.decode(message(shape=shape[:-1], data=bytes(4)), "x").shape == shape[:-1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("delta", [-1, 1, -(10**3), 10**3])
def test_data_length_must_match_shape(dtype, delta):
    msg = wire.encode(torch.zeros(10, 100, dtype=dtype))
    n = len(msg.data) + delta
    msg.data = msg.data[:n] if delta < 0 else msg.data + bytes(delta)
    text = refused(msg)
    assert str(n) in text


def test_data_for_an_empty_shape_must_be_empty():
    refused(message(shape=(0, 3), data=b"\0"))
    refused(message(shape=(), data=b""))  # a 0-dim tensor has one element


def test_huge_shape_without_the_data():
    refused(message(shape=(2**62, 2**62), data=bytes(16)))


def test_max_elements():
    msg = wire.encode(torch.zeros(4, 5))
    text = refused(msg, max_elements=19)
    assert "20" in text and "19" in text
    assert wire.decode(msg, "x", max_elements=20).numel() == 20


def test_max_elements_checked_before_the_data():
    refused(message(shape=(10**6, 10**6), data=b""), max_elements=1000)


@pytest.mark.parametrize("shape", [(0, 2**62, 4), (0, 2**63 - 1, 2**63 - 1), (2**40, 2**40, 0)])
def test_empty_shape_with_enormous_dims(shape):
    """Zero elements and zero bytes of data, but dims torch cannot lay out: refused like any other bad shape,
    not an internal error from torch."""
    refused(message(shape=shape, data=b""))


def decodes_or_refuses(msg: tensor_pb2.Tensor, **checks) -> None:
    """The only acceptable outcomes of decoding anything: a tensor that is exactly what the message says,
    or a BadInputError naming the field."""
    try:
        t = wire.decode(msg, "fuzz.field", **checks)
    except BadInputError as e:
        assert "fuzz.field" in str(e)
        return
    assert t.dtype == wire.FROM_WIRE[msg.dtype]
    assert list(t.shape) == list(msg.shape)
    assert t.numel() * t.element_size() == len(msg.data)
    assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == msg.data


def test_fuzz_random_bytes():
    rng = random.Random(1234)
    parsed = 0
    for _ in range(500):
        raw = rng.randbytes(rng.randint(0, 48))
        try:
            msg = tensor_pb2.Tensor.FromString(raw)
        except DecodeError:
            continue
        parsed += 1
        decodes_or_refuses(msg)
    assert parsed > 0


def test_fuzz_mutated_valid_messages():
    """Bit flips, truncations and splices of real encodings: much more often a parseable message than pure noise."""
    rng = random.Random(5678)
    seeds = [
        wire.encode(sample(s, d, i)).SerializeToString()
        for i, (s, d) in enumerate(zip(SHAPES, DTYPES * 2, strict=True))
    ]
    parsed = 0
    for _ in range(600):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            if op == 0 and raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            elif op == 1:
                del raw[rng.randrange(len(raw) + 1) :]
            elif op == 2:
                at = rng.randrange(len(raw) + 1)
                raw[at:at] = rng.randbytes(rng.randint(1, 8))
            else:
                raw += rng.choice(seeds)  # concatenation merges: repeated shape grows, scalars overwrite
        try:
            msg = tensor_pb2.Tensor.FromString(bytes(raw))
        except DecodeError:
            continue
        parsed += 1
        decodes_or_refuses(msg)
        decodes_or_refuses(msg, dtypes=(torch.float32,), ndim=2, max_elements=64)
    assert parsed > 100


def test_fuzz_random_fields():
    """Messages built field by field from values near every boundary the decoder checks."""
    rng = random.Random(91011)
    dims = [0, 1, 2, 3, 7, -1, -(2**63), 2**31, 2**62, 2**63 - 1]
    for _ in range(400):
        shape = [rng.choice(dims) for _ in range(rng.randint(0, 6))]
        dtype = rng.choice([0, 1, 2, 3, 4, 5, 6, 99])
        data = rng.randbytes(rng.choice([0, 1, 2, 4, 8, 12, 16, 24, 42, 48, 56]))
        msg = tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)
        decodes_or_refuses(msg)
        decodes_or_refuses(msg, dtypes=(torch.bfloat16, torch.int64), ndim=rng.randint(0, 4), max_elements=6)


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 3, 576), (5, 7), (3, 0), (0, 4)], ids=str)
def test_int8_rows_round_trip_within_half_a_step_of_each_rows_scale(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 3, shape[-1] or 1)[-1]
    if x.numel():
        x.view(-1, shape[-1])[0] = 0.0  # an all-zero row
    msg = wire.encode(x, torch.int8)
    assert msg.dtype == tensor_pb2.INT8_ROWS and list(msg.shape) == list(shape)
    rows = x.numel() // shape[-1] if shape[-1] else 0
    assert len(msg.data) == x.numel() + 4 * rows  # about a quarter of float32's bytes
    y = wire.decode(msg, "hidden", dtypes=(torch.int8,), ndim=len(shape))
    assert y.dtype == torch.float32 and y.shape == x.shape
    if x.numel():
        step = x.abs().amax(-1, keepdim=True) / 127
        assert bool(((y - x).abs() <= step / 2 + 1e-6 * step).all())
        assert bool((y.view(-1, shape[-1])[0] == 0).all())
        # the largest magnitude of each row is sent exactly (to float rounding)
        i = x.abs().argmax(-1, keepdim=True)
        assert torch.allclose(y.gather(-1, i), x.gather(-1, i), rtol=1e-6)


def test_int8_rows_are_checked_like_any_message():
    msg = wire.encode(torch.randn(2, 3, 8), torch.int8)
    short = tensor_pb2.Tensor(dtype=msg.dtype, shape=msg.shape, data=msg.data[:-1])
    assert "expected 72" in refused(short)  # 48 values, 6 scales
    assert "at least one dimension" in refused(tensor_pb2.Tensor(dtype=tensor_pb2.INT8_ROWS, shape=[], data=b"x"))
    bad = bytearray(msg.data)
    bad[0:4] = np.float32(np.nan).tobytes()
    assert "scale" in refused(tensor_pb2.Tensor(dtype=msg.dtype, shape=msg.shape, data=bytes(bad)))
    assert "not allowed" in refused(msg, dtypes=(torch.float32,))
    with pytest.raises(ValueError, match="wire"):
        wire.encode(torch.zeros(3, dtype=torch.int8))  # int8 rows are made from floats
