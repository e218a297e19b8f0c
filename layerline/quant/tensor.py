"""`QTensor`: a 2-D weight kept in one of GGML's block formats (as a GGUF file stores it), with its logical shape.

Rows are output features, columns input features; each row is a whole number of blocks, so rows can be sliced,
permuted and stacked without touching the blocks themselves. A QTensor is what a stage holds in memory for a
quantized matmul weight: `nbytes` is the memory it really takes, the size of its share of the file.

Checks: the byte count must match the type and the shape exactly (a truncated or padded tensor is refused), and
every type must be one the kernels support. `quantize` makes Q8_0 ("int8") or Q4_1 ("int4") blocks from float
weights (quantization at load). This module knows nothing of models or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from layerline.errors import CheckpointError, UnsupportedModelError
from layerline.gguf_dequant import _BLOCK, dequantize, qtype_name
from layerline.quant.build import kernels

# GGML type numbers (gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30

# the types the kernels compute from (kernels.c)
KERNEL_TYPES = {t: qtype_name(t) for t in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, F16, BF16, F32)}
INTERLEAVE = True  # lay matrices out in groups of 8 rows where the kernels can (off: the benchmarks' baseline)
TYPE_BY_NAME = {name: t for t, name in KERNEL_TYPES.items()}
# what --quantize makes of float weights ...
QUANTIZE_TO = {"int8": Q8_0, "int4": Q4_1}
# ... except the token embedding and the LM head, which stay at 8 bits under int4 (as llama.cpp's quantizer keeps
# its output tensor at higher precision): 4 bits there cost SmolLM2-135M ~5% perplexity, 4 bits in its layers <1%
EIGHT_BIT_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


ROUTERS = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """A matmul weight a stage may hold quantized: 2-D, and not a MoE router (routers stay float, so that which
    experts a token goes to is decided exactly as the reference decides it)."""
    return len(shape) == 2 and not name.endswith(ROUTERS)


def quantized_type(how: str, name: str) -> int:
    """The block type --quantize `how` gives the matmul weight `name`."""
    return Q8_0 if name in EIGHT_BIT_TENSORS else QUANTIZE_TO[how]


def row_bytes(qtype: int, cols: int) -> int:
    values, nbytes = _BLOCK[qtype]
    if cols % values:
        raise CheckpointError(f"a {qtype_name(qtype)} row of {cols} values is not a whole number of blocks")
    return cols // values * nbytes


def supported_names() -> str:
    return ", ".join(KERNEL_TYPES.values())


def check_type(qtype: int, name: str = "tensor") -> None:
    if qtype not in KERNEL_TYPES:
        raise UnsupportedModelError(
            f"{name}: GGML type {qtype_name(qtype)} has no quantized kernel (supported: {supported_names()})"
        )


@dataclass
class QTensor:
    qtype: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, int]  # (rows, cols): (out features, in features)
    data: torch.Tensor  # uint8 [rows * row_bytes], contiguous, on the CPU
    layout: int = 0  # 0: rows as a GGUF file stores them; 8: groups of 8 rows interleaved (kernels.c, `repack`)

    def __post_init__(self) -> None:
        check_type(self.qtype)
        if len(self.shape) != 2:
            raise CheckpointError(f"a quantized weight must be 2-D, got shape {self.shape}")
        want = self.shape[0] * row_bytes(self.qtype, self.shape[1])
        if self.data.dtype != torch.uint8 or self.data.dim() != 1 or self.data.numel() != want:
            raise CheckpointError(
                f"{qtype_name(self.qtype)} tensor of shape {self.shape} needs {want} bytes, "
                f"got {self.data.numel()} ({self.data.dtype}) (truncated or corrupt?)"
            )

    @classmethod
    def from_raw(
        cls, qtype: int, shape: tuple[int, ...], raw: np.ndarray | torch.Tensor, name: str = "tensor"
    ) -> QTensor:
        """The tensor of a tensor's stored bytes: an array of its own is taken as it is, anything else (e.g. a
        read-only view into a memory-mapped file) copied."""
        check_type(qtype, name)
        if len(shape) != 2:
            raise CheckpointError(f"{name}: a quantized matmul weight must be 2-D, got shape {tuple(shape)}")
        if isinstance(raw, torch.Tensor):
            t = raw
        elif raw.flags.owndata and raw.flags.writeable and raw.dtype == np.uint8:
            t = torch.from_numpy(raw)
        else:
            t = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True))
        try:
            return cls(int(qtype), (int(shape[0]), int(shape[1])), t.reshape(-1).contiguous())
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from None

    @property
    def type_name(self) -> str:
        return qtype_name(self.qtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.qtype, self.shape[1])

    def rows(self) -> torch.Tensor:
        """The data as [rows, row_bytes] (a view), in the file's layout."""
        if self.layout != 0:
            raise ValueError("an interleaved tensor has no rows of its own (see QTensor.layout)")
        return self.data.view(self.shape[0], self.row_bytes)

    def permute_rows(self, order: torch.Tensor) -> QTensor:
        return QTensor(self.qtype, self.shape, self.rows()[order].reshape(-1).contiguous())

    def repack(self) -> QTensor:
        """Interleave this matrix in groups of 8 rows, in place, where the kernels have that layout for its type
        (and its rows are a multiple of 8): computed 2-3x faster, same bytes, no second copy. Returns itself."""
        lib = kernels()
        if not INTERLEAVE or self.layout != 0 or self.shape[0] % 8 or not lib.ll_x8_supported(self.qtype):
            return self
        if lib.ll_repack_x8(self.qtype, self.data.data_ptr(), self.shape[0], self.shape[1]) == 0:
            self.layout = 8
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) as a float tensor [stop - start, cols] (the torch reference decoder for the file's
        layout, the kernels' for an interleaved one)."""
        stop = self.shape[0] if stop is None else stop
        if self.layout != 0:
            out = torch.empty(stop - start, self.shape[1])
            kernels().ll_dequant(
                self.qtype, self.layout, self.data.data_ptr(), start, stop - start, self.shape[1], out.data_ptr(), 1
            )
            return out.to(dtype)
        raw = self.rows()[start:stop].reshape(-1).numpy()
        return dequantize(raw, self.qtype, (stop - start, self.shape[1]), dtype)


def quantize(w: torch.Tensor, qtype: int) -> QTensor:
    """Float weights [rows, cols] as Q8_0 (8 bits and a scale per 32) or Q4_1 (4 bits, a scale and a minimum per
    32) blocks; cols must be a multiple of 32."""
    rows, cols = w.shape
    if cols % 32:
        raise UnsupportedModelError(
            f"quantizing to {qtype_name(qtype)}: rows of {cols} values are not a whole number of 32-blocks"
        )
    out = torch.empty(rows * row_bytes(qtype, cols), dtype=torch.uint8)
    src = w.detach().to("cpu", torch.float32).contiguous()
    if kernels().ll_quantize_weights(qtype, src.data_ptr(), rows, cols, out.data_ptr(), torch.get_num_threads()) != 0:
        raise UnsupportedModelError(f"cannot quantize to {qtype_name(qtype)}")
    return QTensor(qtype, (rows, cols), out)


# byte offsets of the float16 scale fields in one block of each type (ggml-common.h)
_HALF_FIELDS = {
    Q4_0: (0,),
    Q4_1: (0, 2),
    Q5_0: (0,),
    Q5_1: (0, 2),
    Q8_0: (0,),
    Q2_K: (80, 82),
    Q3_K: (108,),
    Q4_K: (0, 2),
    Q5_K: (0, 2),
    Q6_K: (208,),
}


def random_qtensor(qtype: int, shape: tuple[int, int], generator: torch.Generator | None = None) -> QTensor:
    """A QTensor of random blocks with small finite scales: weights of the right type and shape for timing the
    kernels and for tests (what a block decodes to does not change how long it takes)."""
    rows, cols = shape
    if qtype in (F32, F16, BF16):
        dtype = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}[qtype]
        w = (torch.randn(rows, cols, generator=generator) / cols**0.5).to(dtype)
        return QTensor(qtype, shape, w.reshape(-1).view(torch.uint8).clone())
    values, nbytes = _BLOCK[qtype]
    n_blocks = rows * cols // values
    data = torch.randint(0, 256, (n_blocks, nbytes), dtype=torch.uint8, generator=generator)
    scale = 0.5 / (cols**0.5 * 16)
    for off in _HALF_FIELDS[qtype]:
        halves = (torch.rand(n_blocks, generator=generator) * scale + scale / 4).to(torch.float16)
        data[:, off : off + 2] = halves.view(torch.uint8).view(n_blocks, 2)
    return QTensor(qtype, shape, data.reshape(-1))
