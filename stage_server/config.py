"""The stage server's settings, as one typed dataclass filled by the CLI (or by tests) and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from layerline.devices import resolve_device, weights_for
from layerline.grpc_setup import DEFAULT_MAX_MESSAGE_BYTES
from layerline.model import packing_unavailable
from layerline.quant import WeightFormat, resolve
from layerline.rate_limit import parse_rate
from layerline.security import Security
from layerline.stage_server.settings import DEFAULTS

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "StageConfig", "default_kv_cache_bytes"]


def _default(name: str) -> Any:
    """The field's default from the settings table (`settings.SETTINGS`), where the CLI's flags also read it."""
    return DEFAULTS[name]


def default_kv_cache_bytes() -> int:
    """A quarter of the memory available now (Linux), capped at 8 GiB; 2 GiB where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return min(kb * 1024 // 4, 8 << 30)
    except (OSError, StopIteration, ValueError):
        return 2 << 30


@dataclass
class StageConfig:
    model: str  # HF folder or GGUF file (already resolved)
    start: int  # serves layers [start, end)
    end: int
    # fields set from `_default(...)` are the tunable settings: their meaning and flag are in settings.SETTINGS
    host: str = _default("host")
    port: int = _default("port")
    next_address: str = _default("next_address")
    # --dtype: every weight dequantized to it (the exact mode); None: weights as the checkpoint stores them (GGUF
    # blocks stay quantized), computed in float32. After construction: the compute dtype (see `weights`).
    dtype: torch.dtype | None = None
    quantize: str = ""  # "int8" / "int4": float weights quantized at load (Q8_0 / Q4_1 blocks)
    device: str = _default("device")
    wire_dtype: torch.dtype = torch.float32  # dtype of hidden states sent to the next stage
    kv_cache_bytes: int = _default("kv_cache_bytes")
    kv_block_size: int = _default("kv_block_size")
    kv_wait_s: float = _default("kv_wait_s")
    share_prefixes: bool = _default("share_prefixes")
    session_ttl: float = _default("session_ttl")
    max_message_bytes: int = _default("max_message_bytes")
    max_sessions: int = _default("max_sessions")
    max_sessions_per_client: int = _default("max_sessions_per_client")
    max_session_tokens: int = _default("max_session_tokens")
    rate_limit: str = _default("rate_limit")  # OpenSession calls per client key ("N/s"; "" = none)
    max_queued_steps: int = _default("max_queued_steps")
    max_batch: int = _default("max_batch")
    batch_wait: float = 0.005  # seconds a batch waits at most for the steps its first step announces (Step.burst)
    inline_compute_s: float = _default("inline_compute_s")
    pack_weights: bool = _default("pack_weights")
    max_queued_results: int = 4096  # results a subscriber may fall behind before its session is dropped
    loop_ahead: int = _default("loop_ahead")
    threads: int = _default("threads")
    grace: float = 5.0  # seconds in-flight work gets to finish on shutdown
    advertise: str = _default("advertise")
    metrics_port: int = _default("metrics_port")
    draft: str = _default("draft")  # a draft model's name or path ("" = none)
    security: Security = field(default_factory=Security)  # TLS / mutual TLS / token, listening and dialling

    def __post_init__(self) -> None:
        self.weights: WeightFormat = resolve(self.dtype, self.quantize)  # raises ValueError naming the conflict
        device = resolve_device(self.device)  # DeviceError naming what torch sees
        self.device = str(device)
        self.weights = weights_for(self.weights, device)  # float weights in the device's dtype off the CPU
        self.dtype = self.weights.dtype
        if self.kv_cache_bytes <= 0:
            self.kv_cache_bytes = default_kv_cache_bytes()
        if self.kv_block_size < 0:
            raise ValueError(f"--kv-block-size must be 0 (no paging) or positive, got {self.kv_block_size}")
        if not self.kv_wait_s >= 0:
            raise ValueError(f"--kv-wait-ms must be >= 0, got {1e3 * self.kv_wait_s}")
        if not self.inline_compute_s >= 0:
            raise ValueError(f"--inline-below-ms must be >= 0, got {1e3 * self.inline_compute_s}")
        if self.rate_limit:
            parse_rate(self.rate_limit)  # ValueError naming the form
        if self.session_ttl <= 0:
            raise ValueError(f"session TTL must be positive, got {self.session_ttl}")
        for name in ("max_queued_steps", "max_batch", "loop_ahead", "max_sessions_per_client", "max_session_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pack_weights:
            why = packing_unavailable(self.dtype, torch.device(self.device))
            if self.weights.quantizes:
                why = f"packed weights are for float32 weights, not for --quantize {self.quantize}"
            if why:
                raise ValueError(f"--pack-weights: {why}")
        if self.max_queued_results <= self.loop_ahead:
            raise ValueError(
                f"max_queued_results ({self.max_queued_results}) must be more than loop_ahead ({self.loop_ahead})"
            )
