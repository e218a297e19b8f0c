"""Rotary position embeddings: inverse frequencies (default, linear and llama3 scaling) and a cos/sin table that
grows on demand and is gathered by per-row positions.

The arithmetic follows the reference implementation step by step (frequencies in float32, `pos * inv_freq`, then
cos/sin) so that the tables are bitwise what transformers computes.
"""

from __future__ import annotations

import math

import torch

from layerline.config import ModelConfig


def inverse_frequencies(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """`local`: the sliding layers' own base (gemma3's `local_rope_theta`), never scaled."""
    dim = config.head_dim
    theta = config.local_rope_theta if local and config.local_rope_theta else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = None if local else config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    if s.rope_type == "llama3":
        low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise AssertionError(f"unhandled rope type {s.rope_type}")  # config.py refuses the others


class RotaryTable:
    """cos/sin for positions [0, n), in float32 on one device; `lookup` casts to the compute dtype."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", local: bool = False) -> None:
        self.inv_freq = inverse_frequencies(config, local).to(device)
        self.device = torch.device(device)
        self.cos = torch.empty(0, config.head_dim, device=device)
        self.sin = torch.empty(0, config.head_dim, device=device)

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cos.shape[0], 256)
        pos = torch.arange(n, device=self.device, dtype=torch.int64)
        freqs = pos[:, None].float() * self.inv_freq  # [n, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, D]
        self.cos, sin = emb.cos(), emb.sin()
        half = sin.shape[-1] // 2
        # rotate_half's minus sign folded into the table (exact: a sign flip does not round)
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T], all in [0, top) -> cos, signed sin: [B, 1, T, D]"""
        if top > self.cos.shape[0]:
            self._grow(top)
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, signed_sin: [B, 1, T, D] from `RotaryTable.lookup`. Equals the reference
    x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) and the sign already in signed_sin."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * signed_sin
