"""Quantized weights: how a stage holds its matmul weights, and the kernels that compute from them.

A stage holds its weights in one of these forms (`WeightFormat.kind`):

- ``stored`` (the default): as the checkpoint stores them. A GGUF file's Q4_K, Q6_K, Q8_0... blocks stay those
  blocks in memory (`QTensor`), so a stage needs about its share of the file; float checkpoints stay float.
- ``float``: every weight dequantized to the compute dtype: the exact mode, checked against transformers. Chosen by
  giving a dtype (`--dtype float32`).
- ``int8`` / ``int4``: float weights quantized at load into Q8_0 / Q4_1 blocks (`--quantize`).

Quantized stages compute in float32 on the CPU (`kernels.c`, built on the host by `build.py`; `linear.py` wraps
them). Where the kernels cannot be built, a quantized stage falls back to float weights and says what that costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerline.quant.tensor import QUANTIZE_TO

KINDS = ("stored", "float", "int8", "int4")


@dataclass(frozen=True)
class WeightFormat:
    kind: str  # one of KINDS
    dtype: torch.dtype  # the stage's compute dtype

    @property
    def quantizes(self) -> bool:
        return self.kind in QUANTIZE_TO

    @property
    def name(self) -> str:
        """How the weight cache and the fetch protocol name it: a float dtype, "stored", "int8" or "int4"."""
        return str(self.dtype).removeprefix("torch.") if self.kind == "float" else self.kind


def resolve(dtype: torch.dtype | None = None, quantize: str = "") -> WeightFormat:
    """The weight format for a --dtype (None: not given) and a --quantize ("" / "int8" / "int4")."""
    if quantize:
        if quantize not in QUANTIZE_TO:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_TO)}, got {quantize!r}")
        if dtype not in (None, torch.float32):
            raise ValueError(
                f"quantized weights compute in float32; --dtype {str(dtype).removeprefix('torch.')} "
                f"cannot go with --quantize {quantize}"
            )
        return WeightFormat(quantize, torch.float32)
    if dtype is not None:
        return WeightFormat("float", dtype)
    return WeightFormat("stored", torch.float32)


def from_name(name: str) -> WeightFormat:
    """The format `WeightFormat.name` names ("float32", "bfloat16", "float16", "stored", "int8", "int4")."""
    floats = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name in floats:
        return WeightFormat("float", floats[name])
    if name == "stored":
        return WeightFormat("stored", torch.float32)
    if name in QUANTIZE_TO:
        return WeightFormat(name, torch.float32)
    raise ValueError(f"weight format {name!r} is not one of {', '.join([*floats, 'stored', *QUANTIZE_TO])}")
