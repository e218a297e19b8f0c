"""Which device a stage computes on: `--device auto|cpu|cuda|cuda:N|mps` resolved against what torch sees, and
the float dtype a user would pick there.

`auto` takes the first CUDA GPU torch sees, else Apple's MPS, else the CPU. A device torch does not see is an
error that names the ones it does. What torch sees can be given (`Visible`) so that the choice is tested the same
on machines with and without GPUs.
"""

from __future__ import annotations

import functools
import platform
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


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (CUDA, MPS); nothing to wait for on the CPU. Timings need it."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(torch.device(device))
    elif kind == "mps":
        torch.mps.synchronize()


class HostStaging:
    """The host side of a stage's hops on a device other than the CPU: hidden states cross to the device once
    per step and back once, through host buffers kept from step to step (pinned on CUDA, so the copies are
    non-blocking DMA), grown when a step is bigger than any before and never freed on the hot path.

    On the CPU it is a pass-through (nothing is copied), unless `staged` asks for the buffers anyway (tests)."""

    def __init__(self, device: torch.device | str, staged: bool | None = None) -> None:
        self.device = torch.device(device)
        self.staged = self.device.type != "cpu" if staged is None else staged
        self.pinned = self.device.type == "cuda"
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._pending: dict[str, object] = {}  # direction -> the event of the last copy that read/wrote its buffer
        self.grown = 0  # buffers (re)allocated: a handful at the first steps, then none

    def _buffer(self, way: str, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        n = shape.numel()
        buf = self._buffers.get((way, dtype))
        if buf is None or buf.numel() < n:
            size = max(n, 2 * buf.numel() if buf is not None else 0)
            buf = torch.empty(size, dtype=dtype, pin_memory=self.pinned)
            self._buffers[(way, dtype)] = buf
            self.grown += 1
        return buf[:n].view(shape)

    def _wait(self, way: str) -> None:
        event = self._pending.pop(way, None)
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]

    def _record(self, way: str) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._pending[way] = event

    def to_device(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` (a host tensor, e.g. a message's bytes) on the device in `dtype`."""
        if not self.staged or x.device.type != "cpu":  # (from another device in one process: copied directly)
            return x.to(self.device, dtype)
        self._wait("in")  # the buffer's previous copy to the device has been read out
        host = self._buffer("in", x.dtype, x.shape)
        host.copy_(x)
        out = host.to(self.device, dtype, non_blocking=self.pinned)
        self._record("in")
        return out

    def to_host(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`t` (on the device) as a host tensor of `dtype`, valid until the next `to_host` (encode it at once)."""
        if not self.staged:
            return t if dtype is None else t.to(dtype)
        host = self._buffer("out", dtype or t.dtype, t.shape)
        host.copy_(t, non_blocking=self.pinned)
        if self.pinned:
            torch.cuda.current_stream(self.device).synchronize()
        elif self.device.type == "mps":
            torch.mps.synchronize()
        return host


@dataclass(frozen=True)
class DeviceMemory:
    """A device's name and memory: what this process holds there (`used`) of its `total`, and what is `free`."""

    name: str
    used: int
    total: int
    free: int


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device | str) -> str:
    """What a user calls the device: the GPU's name, "Apple MPS", or the CPU's model name."""
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    if d.type == "mps":
        return "Apple MPS"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine() or "unknown")


def device_memory(device: torch.device | str) -> DeviceMemory:
    """A GPU's name and memory. CUDA: this process's reserved bytes there, the GPU's total and free from the
    driver. MPS: the driver's allocation of this process of the recommended working set. (The CPU's figures come
    from the host: `layerline.stage_server.capacity.device_memory`.)"""
    d = torch.device(device)
    if d.type == "cuda":
        free, total = torch.cuda.mem_get_info(d)
        return DeviceMemory(device_name(d), int(torch.cuda.memory_reserved(d)), int(total), int(free))
    if d.type == "mps":
        total = int(torch.mps.recommended_max_memory())
        used = int(torch.mps.driver_allocated_memory())
        return DeviceMemory(device_name(d), used, total, max(0, total - used))
    raise DeviceError(f"{d}: the CPU's memory is the host's (layerline.stage_server.capacity.device_memory)")
