"""Which device a stage computes on: `--device auto|cpu|cuda|cuda:N|mps` resolved against what torch sees, and
the float dtype a user would pick there.

`auto` takes the first CUDA GPU torch sees, else Apple's MPS, else the CPU. A device torch does not see is an
error that names the ones it does. What torch sees can be given (`Visible`) so that the choice is tested the same
on machines with and without GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from layerline.errors import LayerlineError
from layerline.quant import WeightFormat

CHOICES = "auto, cpu, cuda, cuda:N or mps"
T = TypeVar("T")


class DeviceError(LayerlineError, ValueError):
    """A device that is not one of CHOICES, or that torch does not see here."""


@dataclass(frozen=True)
class Visible:
    """The devices torch sees: how many CUDA GPUs, whether MPS is there, and whether the GPUs compute in bf16."""

    cuda: int
    mps: bool
    cuda_bf16: bool = True

    @classmethod
    def here(cls) -> Visible:
        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        mps_backend = getattr(torch.backends, "mps", None)
        mps = bool(mps_backend is not None and mps_backend.is_available())
        bf16 = bool(cuda and torch.cuda.is_bf16_supported())
        return cls(cuda, mps, bf16)

    def names(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(self.cuda)] + (["mps"] if self.mps else [])


def resolve_device(spec: str | torch.device, visible: Visible | None = None) -> torch.device:
    """The torch device `spec` names, checked against what torch sees (DeviceError naming it otherwise)."""
    text = str(spec).strip().lower()
    seen = visible if visible is not None else Visible.here()
    if text == "auto":
        return torch.device("cuda:0" if seen.cuda else "mps" if seen.mps else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not seen.mps:
            raise DeviceError(f"--device mps: torch sees no MPS device here (it sees {', '.join(seen.names())})")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2] or "0"
        if not index.isdigit():
            raise DeviceError(f"--device {spec}: a CUDA device is cuda or cuda:N with N a number")
        if int(index) >= seen.cuda:
            what = f"{seen.cuda} CUDA device(s)" if seen.cuda else "no CUDA device"
            raise DeviceError(f"--device {spec}: torch sees {what} here (it sees {', '.join(seen.names())})")
        return torch.device(f"cuda:{int(index)}")
    raise DeviceError(f"--device {spec}: not a device layerline knows ({CHOICES})")


def one_per_stage(devices: Sequence[T], stages: int, said: str = "") -> list[T]:
    """`devices` as one per stage: one given stands for all of them. `said` starts the error's message."""
    if len(devices) == 1:
        return list(devices) * stages
    if len(devices) != stages:
        raise DeviceError(f"{said}{len(devices)} device(s) for {stages} stage(s): give one or one per stage")
    return list(devices)


def resolve_devices(specs: str, stages: int, visible: Visible | None = None) -> list[torch.device]:
    """`--devices cuda:0,cpu,...`: one device per stage (one given for all of them)."""
    parts = one_per_stage([p for p in (s.strip() for s in specs.split(",")) if p], stages, "--devices names ")
    seen = visible if visible is not None else Visible.here()
    return [resolve_device(p, seen) for p in parts]


def float_dtype(device: torch.device, visible: Visible | None = None) -> torch.dtype:
    """The dtype a stage on `device` computes float weights in when none is asked for: bf16 on a CUDA GPU that has
    it (else fp16), fp16 on MPS, float32 on the CPU (where quantized weights keep their own kernels)."""
    if device.type == "cuda":
        seen = visible if visible is not None else Visible.here()
        return torch.bfloat16 if seen.cuda_bf16 else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def weights_for(fmt: WeightFormat, device: torch.device, visible: Visible | None = None) -> WeightFormat:
    """The weight format a stage on `device` holds. The quantized kernels compute on the CPU: elsewhere a stage
    given no dtype holds float weights in the device's dtype (a GGUF file's blocks are then dequantized at load,
    and the loader says what that costs); --quantize there is an error, not silently dropped."""
    if device.type == "cpu" or fmt.kind == "float":
        return fmt
    dtype = float_dtype(device, visible)
    if fmt.quantizes:
        raise DeviceError(
            f"--quantize {fmt.kind} computes on the CPU; on {device} the weights are held in "
            f"{str(dtype).removeprefix('torch.')}: drop --quantize or use --device cpu"
        )
    return WeightFormat("float", dtype)
