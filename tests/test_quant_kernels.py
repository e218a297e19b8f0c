"""The quantized kernels (layerline/quant/kernels.c) against references nobody here wrote and against themselves.

- Decoding: every type's rows decode bit for bit as the `gguf` package's numpy reference decodes them (via
  layerline's torch decoder, itself checked bit for bit against gguf in test_gguf_dequant.py).
- Matmul: the kernels quantize activations to 8 bits per value in blocks (32 values for the legacy types, 256 for
  the k-quants), as llama.cpp does. Emulating exactly that rounding in float64 and multiplying with the decoded
  weights must give the kernels' result to float32 rounding (relative 1e-5): this pins down every bit of the
  integer arithmetic. Against a plain float32 matmul on the decoded weights the difference is the activation
  rounding itself: below 2e-2 of the largest output (typically 5e-3).
- The AVX2 paths equal the plain C ones; several activation rows at once equal each row alone (bitwise).
- Blocks made by the `gguf` package's own quantizers (legacy types) and by llama.cpp (the real SmolLM2 file:
  Q4_1 layers, a Q8_0 embedding) go through the same checks; k-quants are checked on random blocks, which cover
  every bit pattern of their scales and values (the `gguf` package cannot make k-quant blocks).
"""

from __future__ import annotations

import threading

import gguf
import numpy as np
import pytest
import torch

from layerline.errors import CheckpointError, UnsupportedModelError
from layerline.gguf_dequant import dequantize
from layerline.gguf_file import GGUFFile
from layerline.quant.build import kernels, simd
from layerline.quant.linear import TILE_MIN_ROWS, QuantEmbedding, QuantLinear
from layerline.quant.tensor import (
    BF16,
    F16,
    F32,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    QTensor,
    quantize,
    random_qtensor,
)

BLOCK_TYPES = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K]
ALL_TYPES = BLOCK_TYPES + [F16, BF16, F32]
NAMES = {t: gguf.GGMLQuantizationType(t).name for t in ALL_TYPES}
K_QUANTS = {Q2_K, Q3_K, Q4_K, Q5_K, Q6_K}


def emulated(x: torch.Tensor, qtype: int) -> torch.Tensor:
    """x [rows, k] rounded as the kernels quantize activations: blocks of 32 (256 for k-quants), scale amax / 127,
    values rounded to nearest (even); float types are used as they are."""
    if qtype in (F16, BF16, F32):
        return x.double()
    block = 256 if qtype in K_QUANTS else 32
    xb = x.double().reshape(x.shape[0], -1, block)
    d = (xb.abs().amax(-1, keepdim=True).float() / 127.0).double()  # the kernels compute the scale in float32
    inv = torch.where(d > 0, (1.0 / d.float()).double(), torch.zeros_like(d))
    q = torch.round((xb.float() * inv.float()).double())
    return (q * d).reshape(x.shape)


def kernel_matmul(w: QTensor, x: torch.Tensor, ref: bool = False) -> torch.Tensor:
    lib = kernels()
    rows, k = x.shape
    xq = torch.empty(rows * lib.ll_act_bytes(w.qtype, k), dtype=torch.uint8)
    x = x.contiguous()
    lib.ll_quantize_act(w.qtype, x.data_ptr(), rows, k, xq.data_ptr())
    y = torch.empty(rows, w.shape[0])
    (lib.ll_gemm_ref if ref else lib.ll_gemm)(
        w.qtype, w.data.data_ptr(), w.shape[0], k, xq.data_ptr(), rows, y.data_ptr()
    )
    return y


def check_matmul(w: QTensor, x: torch.Tensor) -> None:
    wf = w.dequantize(torch.float64)
    y = kernel_matmul(w, x)
    scale = (x.double() @ wf.t()).abs().max().item()
    exact = emulated(x, w.qtype) @ wf.t()
    assert (y.double() - exact).abs().max().item() <= 1e-5 * scale, NAMES[w.qtype]
    assert (y.double() - x.double() @ wf.t()).abs().max().item() <= 2e-2 * scale, NAMES[w.qtype]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=NAMES.get)
def test_random_blocks_decode_and_multiply_as_the_references(qtype):
    g = torch.Generator().manual_seed(qtype)
    w = random_qtensor(qtype, (48, 512), g)
    out = torch.empty(20, 512)
    kernels().ll_dequant(qtype, 0, w.data.data_ptr(), 8, 20, 512, out.data_ptr(), 1)
    assert torch.equal(out, dequantize(w.rows()[8:28].reshape(-1).numpy(), qtype, (20, 512), torch.float32))
    x = torch.randn(7, 512, generator=g)
    check_matmul(w, x)
    # the SIMD paths and the plain C ones agree; 7 rows go as 4 + 3, each as it would alone
    both = kernel_matmul(w, x), kernel_matmul(w, x, ref=True)
    assert (both[0] - both[1]).abs().max() <= 1e-5 * both[1].abs().max()
    alone = torch.cat([kernel_matmul(w, x[i : i + 1]) for i in range(7)])
    assert torch.equal(alone, both[0])


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0], ids=NAMES.get)
def test_blocks_made_by_the_gguf_package(qtype):
    rng = np.random.default_rng(qtype)
    a = rng.standard_normal((40, 256)).astype(np.float32)
    raw = gguf.quants.quantize(a, gguf.GGMLQuantizationType(qtype))
    w = QTensor.from_raw(qtype, (40, 256), raw.reshape(-1))
    assert torch.equal(w.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype))))
    check_matmul(w, torch.randn(3, 256, generator=torch.Generator().manual_seed(1)))


def test_tensors_of_the_real_file(smollm2_path):
    """llama.cpp's own Q4_1 layer weights and Q8_0 embedding from SmolLM2-135M (rows taken from each)."""
    g = GGUFFile(smollm2_path)
    for name in ("blk.3.ffn_down.weight", "blk.0.attn_q.weight", "token_embd.weight"):
        t = g.tensors[name]
        rows = min(t.shape[0], 256)
        q = QTensor.from_raw(t.qtype, t.shape, g.read_bytes(t))
        part = QTensor(q.qtype, (rows, q.shape[1]), q.rows()[:rows].reshape(-1).contiguous())
        assert torch.equal(part.dequantize(), dequantize(t.raw, t.qtype, t.shape, torch.float32)[:rows])
        check_matmul(part, torch.randn(2, q.shape[1], generator=torch.Generator().manual_seed(2)))


def test_quantize_at_load_matches_the_gguf_package():
    """--quantize int8 / int4 make Q8_0 / Q4_1 blocks that decode to what gguf's own quantizers give, up to a
    rounding step on the rare values that sit on a half (gguf rounds those away from zero)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    for how, qtype in (("int8", Q8_0), ("int4", Q4_1)):
        ours = quantize(w, qtype)
        theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(qtype))
        ref = torch.from_numpy(gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType(qtype)))
        got = ours.dequantize()
        step = (w.abs().max() / (127 if how == "int8" else 7)).item()
        assert (got - ref).abs().max().item() <= step
        assert (got != ref).float().mean().item() < 0.01
        assert (got - w).abs().max().item() <= step  # within a quantization step of the float weights


def test_fusions_and_the_tiled_path_compute_the_same_layer():
    g = torch.Generator().manual_seed(4)
    k, n = 256, 96
    parts = [random_qtensor(Q4_K, (64, k), g), random_qtensor(Q6_K, (32, k), g)]  # two types in one linear
    bias = torch.randn(n, generator=g)
    lin = QuantLinear(parts, bias)
    wf = torch.cat([p.dequantize(torch.float64) for p in parts])
    norm_w = torch.rand(k, generator=g) + 0.5
    for rows in (1, 3, TILE_MIN_ROWS + 5):  # the kernels, then tiles through torch's matmul
        x = torch.randn(rows, k, generator=g)
        y = lin(x)
        assert (y.double() - (x.double() @ wf.t() + bias)).abs().max() <= 2e-2 * y.abs().max()
        xn = torch.nn.functional.rms_norm(x, (k,), norm_w, 1e-5)
        y_norm = lin(x, norm=norm_w, eps=1e-5)
        assert (y_norm - lin(xn)).abs().max() <= 1e-4 * y_norm.abs().max()
        gu = torch.randn(rows, 2 * k, generator=g)
        act = torch.nn.functional.silu(gu[:, :k]) * gu[:, k:]
        y_swiglu = lin(gu, swiglu=True)
        assert (y_swiglu - lin(act)).abs().max() <= 1e-4 * y_swiglu.abs().max()
        acc = torch.randn(rows, n, generator=g)
        before = acc.clone()
        assert lin(x, add_to=acc) is acc
        assert (acc - (before + y)).abs().max() <= 1e-5 * acc.abs().max()


def test_embedding_rows_are_decoded_rows():
    table = random_qtensor(Q6_K, (100, 256), torch.Generator().manual_seed(5))
    ids = torch.tensor([[3, 99, 0], [3, 7, 42]])
    assert torch.equal(QuantEmbedding(table)(ids), table.dequantize()[ids])


def test_bad_blocks_are_refused_at_load():
    w = random_qtensor(Q4_K, (4, 256))
    with pytest.raises(CheckpointError, match="needs 576 bytes, got 575"):
        QTensor(Q4_K, (4, 256), w.data[:-1].clone())
    with pytest.raises(CheckpointError, match="not a whole number of blocks"):
        QTensor(Q4_K, (4, 128), w.data[:288].clone())
    iq = int(gguf.GGMLQuantizationType.IQ2_XS)
    with pytest.raises(UnsupportedModelError, match=r"IQ2_XS has no quantized kernel \(supported: Q4_0, Q4_1"):
        QTensor.from_raw(iq, (4, 256), np.zeros(4 * 74, dtype=np.uint8), name="blk.0.ffn_up.weight")


def test_the_kernels_run_on_torchs_thread_count_from_any_thread():
    """torch.set_num_threads is what the kernels follow, also on a thread torch never set (a stage computes on a
    thread of its own, where OpenMP's own default would be every core)."""
    lib = kernels()
    before = torch.get_num_threads()
    seen: list = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            return lambda *args: seen.append((name, args[-1])) or fn(*args)

    lin = QuantLinear([random_qtensor(Q4_K, (64, 256))])  # row layout: many rows go through decoded tiles
    lin.lib = Spy()
    try:
        torch.set_num_threads(1)
        worker = threading.Thread(target=lambda: seen.append(("team", lib.ll_threads(torch.get_num_threads()))))
        worker.start()
        worker.join()
        lin(torch.randn(2, 256))
        lin(torch.randn(TILE_MIN_ROWS, 256))
        torch.set_num_threads(2)
        assert lib.ll_threads(torch.get_num_threads()) == 2  # one pool: torch's OpenMP runtime
    finally:
        torch.set_num_threads(before)
    assert seen == [("team", 1), ("ll_linear", 1), ("ll_dequant", 1)]
    assert simd() == expected_simd()


def expected_simd() -> str:
    """What -march=native gives on this CPU, from the flags Linux reports for it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return simd()  # no cpuinfo to check against
    if not {"avx2", "fma", "f16c"} <= flags:
        return "c"
    vnni = {"avx512_vnni", "avx512vl"} <= flags or "avx_vnni" in flags
    return "avx2+vnni" if vnni else "avx2"
