"""Stages chained in one process: the reference pipeline with no network in between, and token generation on it
(streaming for one sequence, batched for many prompts of different lengths).

Used by `layerline run`, by the tests that compare layerline with transformers, and by the benchmarks as the
"one process" baseline. The stage servers reuse the stage models, not this loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch

from layerline.checkpoint import load_stage, open_checkpoint
from layerline.config import ModelConfig
from layerline.kv_cache import KVCache
from layerline.model import StageModel
from layerline.quant import WeightFormat, resolve
from layerline.sampling import SamplingParams, draw_generator, sample


def split_layers(
    num_layers: int, stages: int | None = None, counts: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Contiguous ranges: `counts` layers per stage (must sum to num_layers) or `stages` near-equal parts."""
    if counts is None:
        if stages is None or not 1 <= stages <= num_layers:
            raise ValueError(f"cannot split {num_layers} layers into {stages} stages")
        base, extra = divmod(num_layers, stages)
        counts = [base + (1 if i < extra else 0) for i in range(stages)]
    if any(c <= 0 for c in counts) or sum(counts) != num_layers:
        raise ValueError(f"layer counts {list(counts)} must be positive and sum to the model's {num_layers} layers")
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


class LocalPipeline:
    def __init__(self, stages: Sequence[StageModel]) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        expect = 0
        for s in stages:
            if s.start != expect or s.config != stages[0].config:
                raise ValueError("stages must be of one model and cover its layers contiguously from 0")
            expect = s.end
        if expect != stages[0].config.num_layers:
            raise ValueError(f"stages cover layers 0:{expect} of {stages[0].config.num_layers}")
        self.stages = list(stages)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        ranges: Sequence[tuple[int, int]],
        dtype: torch.dtype | None = None,
        quantize: str = "",
        *,
        weights: WeightFormat | None = None,
        device: str | torch.device | Sequence[str | torch.device] = "cpu",
    ) -> LocalPipeline:
        """Stages of `ranges` in this process; the weights' form as for `load_stage` (no dtype: a GGUF file's
        blocks stay quantized; a dtype: the exact mode). `device`: one for every stage ("auto", "cpu", "cuda:1",
        "mps"), or one per stage."""
        devices = [device] * len(ranges) if isinstance(device, (str, torch.device)) else list(device)
        if len(devices) != len(ranges):
            raise ValueError(f"{len(devices)} device(s) for {len(ranges)} stage(s)")
        ckpt = open_checkpoint(path)
        try:
            fmt = weights or resolve(dtype, quantize)
            return cls(
                [
                    load_stage(path, a, b, device=d, checkpoint=ckpt, weights=fmt)
                    for (a, b), d in zip(ranges, devices, strict=True)
                ]
            )
        finally:
            ckpt.close()

    @property
    def config(self) -> ModelConfig:
        return self.stages[0].config

    def new_caches(self, rows: int, max_len: int) -> list[KVCache]:
        return [s.new_cache(rows, max_len) for s in self.stages]

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        caches: Sequence[KVCache] | None = None,
        rows: list[int] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """ids [B, T] -> float32 logits [B, T|1, vocab]"""
        h = ids
        for i, s in enumerate(self.stages):
            h = s(h, positions, caches[i] if caches else None, rows, last_only=last_only)
        return h

    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_token_ids: Sequence[int] = (),
        prefill_chunk: int | None = None,
    ) -> Iterator[int]:
        """Stream the next tokens of one sequence (a stop token is yielded, then generation ends)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        for emitted in self._steps([prompt], max_new_tokens, sampling, stop_token_ids, prefill_chunk):
            yield emitted[0][1]

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_token_ids: Sequence[int] = (),
        prefill_chunk: int | None = None,
    ) -> list[list[int]]:
        """The new tokens of each prompt; prompts of different lengths run as one left-padded batch."""
        out: list[list[int]] = [[] for _ in prompts]
        for emitted in self._steps(prompts, max_new_tokens, sampling, stop_token_ids, prefill_chunk):
            for b, tok in emitted:
                out[b].append(tok)
        return out

    def _steps(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams,
        stop_token_ids: Sequence[int],
        prefill_chunk: int | None,
    ) -> Iterator[list[tuple[int, int]]]:
        """Yields per decode step the (row, token) of every row still generating."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens <= 0:
            return
        B, longest = len(prompts), max(len(p) for p in prompts)
        max_len = longest + max_new_tokens
        caches = self.new_caches(B, max_len)
        # left padding: every row's last prompt token is in the last column
        ids = torch.zeros(B, longest, dtype=torch.int64)
        positions = torch.full((B, longest), -1, dtype=torch.int64)
        for b, p in enumerate(prompts):
            ids[b, longest - len(p) :] = torch.tensor(list(p), dtype=torch.int64)
            positions[b, longest - len(p) :] = torch.arange(len(p))
        chunk = prefill_chunk or longest
        for c0 in range(0, longest, chunk):
            logits = self.forward(ids[:, c0 : c0 + chunk], positions[:, c0 : c0 + chunk], caches, last_only=True)
        seed = sampling.base_seed()
        history = [list(p) for p in prompts]
        active = list(range(B))
        stops = set(stop_token_ids)
        for i in range(max_new_tokens):
            generator = None if sampling.greedy else draw_generator(seed, i)
            nxt = sample(logits[:, -1], sampling, generator, [history[b] for b in active]).tolist()
            emitted = list(zip(active, nxt, strict=True))
            for b, tok in emitted:
                history[b].append(tok)
            yield emitted
            active = [b for b, tok in emitted if tok not in stops]
            if not active or i == max_new_tokens - 1:
                return
            step = torch.tensor([[history[b][-1]] for b in active], dtype=torch.int64)
            pos = torch.tensor([[len(history[b]) - 1] for b in active], dtype=torch.int64)
            logits = self.forward(step, pos, caches, rows=active, last_only=True)
