"""The sampling settings and their one check (torch-free: the client SDK checks a request with it before sending,
the stages check what arrives with it, and layerline.sampling applies them)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20  # alternatives a sampled or scored token may come with (OpenAI's limit)


def sampling_problems(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> list[str]:
    """What is wrong with these settings, one message each (none: they are valid)."""
    problems = []
    if not temperature >= 0:
        problems.append(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        problems.append(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        problems.append(f"repetition_penalty must be > 0, got {repetition_penalty}")
    return problems


def logprob_problems(top_logprobs: int) -> list[str]:
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        return [f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}"]
    return []


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits are divided by it before sampling
    top_k: int = 0  # keep only the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (1.0 = off)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (1.0 = off)
    seed: int | None = None  # same seed, same settings, same prompt -> same tokens
    logprobs: bool = False  # report each sampled token's log-probability (of the model's distribution) ...
    top_logprobs: int = 0  # ... and this many most likely tokens at it (implies logprobs)

    def __post_init__(self) -> None:
        problems = sampling_problems(self.temperature, self.top_k, self.top_p, self.repetition_penalty)
        problems += logprob_problems(self.top_logprobs)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def base_seed(self) -> int:
        """The seed of a generation: `seed`, or a fresh random one."""
        return self.seed if self.seed is not None else secrets.randbits(63)
