"""The stage server's settings, as one typed dataclass filled by the CLI (or by tests) and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerline.devices import resolve_device, weights_for
from layerline.model import packing_unavailable
from layerline.quant import WeightFormat, resolve
from layerline.security import Security

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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
    host: str = "127.0.0.1"  # address to bind
    port: int = 0  # 0 = any free port (the ready line says which)
    next_address: str = ""  # default next stage, host:port ("" = sessions name it, or this is the last stage)
    # --dtype: every weight dequantized to it (the exact mode); None: weights as the checkpoint stores them (GGUF
    # blocks stay quantized), computed in float32. After construction: the compute dtype (see `weights`).
    dtype: torch.dtype | None = None
    quantize: str = ""  # "int8" / "int4": float weights quantized at load (Q8_0 / Q4_1 blocks)
    device: str = "cpu"  # auto, cpu, cuda, cuda:N or mps (layerline.devices); after construction: the one chosen
    wire_dtype: torch.dtype = torch.float32  # dtype of hidden states sent to the next stage
    kv_cache_bytes: int = 0  # KV cache budget for all sessions; 0 = default_kv_cache_bytes()
    session_ttl: float = 600.0  # seconds without use after which a session is closed
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest gRPC message sent or received
    max_sessions: int = 1024  # open sessions at most
    max_sessions_per_client: int = 256  # open sessions one client (client key) may hold at most
    max_session_tokens: int = 1 << 20  # rows x max_length of one session at most (positions its KV cache holds)
    max_queued_steps: int = 64  # steps waiting for compute before senders are slowed down (flow control)
    max_batch: int = 16  # decode steps of different sessions run as one forward pass, up to this many (1: never)
    batch_wait: float = 0.005  # seconds a batch waits at most for the steps its first step announces (Step.burst)
    inline_compute_s: float = 0.001  # an idle stage computes decode steps faster than this on its event loop (0: never)
    pack_weights: bool = False  # a second, oneDNN-packed copy of the weights for steps of 4+ rows (model.pack_weight)
    max_queued_results: int = 4096  # results a subscriber may fall behind before its session is dropped
    loop_ahead: int = 32  # a generation loop pauses while its subscriber is this many results behind (slow reader)
    threads: int = 0  # torch threads for compute; 0 = torch's default
    grace: float = 5.0  # seconds in-flight work gets to finish on shutdown
    advertise: str = ""  # address other processes should use; "" = host:port
    metrics_port: int = -1  # Prometheus metrics on host:metrics_port (0: any free port; -1: off)
    security: Security = field(default_factory=Security)  # TLS / mutual TLS / token, listening and dialling

    def __post_init__(self) -> None:
        self.weights: WeightFormat = resolve(self.dtype, self.quantize)  # raises ValueError naming the conflict
        device = resolve_device(self.device)  # DeviceError naming what torch sees
        self.device = str(device)
        self.weights = weights_for(self.weights, device)  # float weights in the device's dtype off the CPU
        self.dtype = self.weights.dtype
        if self.kv_cache_bytes <= 0:
            self.kv_cache_bytes = default_kv_cache_bytes()
        if not self.inline_compute_s >= 0:
            raise ValueError(f"--inline-below-ms must be >= 0, got {1e3 * self.inline_compute_s}")
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
