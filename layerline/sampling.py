"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty, seeded.

Pure functions over [B, vocab] float32 logits, usable by an in-process pipeline and by the last stage server alike.
The order of the transformations is the one Hugging Face's generate applies (repetition penalty, temperature,
top-k, top-p), so the same settings mean the same thing.
"""

from __future__ import annotations

import torch

from layerline.sampling_params import SamplingParams, sampling_problems

__all__ = ["SamplingParams", "draw_generator", "filter_logits", "sample", "sampling_problems", "verify"]

SEED_STRIDE = 0x9E3779B97F4A7C15  # odd (2^64 / golden ratio): draws of one seed land far apart


def draw_generator(seed: int, draw: int) -> torch.Generator:
    """The random numbers of the `draw`-th sampling step (0, 1, ...) of a generation seeded with `seed`: a function
    of the two alone, not of the draws before. A generation replayed on other stages after a failure therefore
    continues with the numbers it would have had (`SamplingParams.draws` on the wire says where it is)."""
    g = torch.Generator()
    g.manual_seed((seed + draw * SEED_STRIDE) % 2**64)
    return g


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
    """logits [B, V]; each row's seen tokens get logit / penalty (if positive) or logit * penalty."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for b, seen in enumerate(history):
        if not seen:
            continue
        idx = torch.tensor(sorted(set(seen)), dtype=torch.int64, device=logits.device)
        vals = logits[b, idx]
        logits[b, idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits outside top-k / top-p to -inf. logits [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    history: list[list[int]] | None = None,
) -> torch.Tensor:
    """logits [B, V] float32 -> next token ids [B] int64."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def verify(
    logits: torch.Tensor,
    drafts: list[int],
    params: SamplingParams,
    seed: int = 0,
    draws: int = 0,
    history: list[int] | None = None,
) -> list[int]:
    """Speculative decoding's check of proposed tokens: `logits` [len(drafts) + 1, V] are the model's at the
    positions of the last real token and of each proposal; returns the accepted run of `drafts` and one token more
    (the model's own where it disagreed, or the next one after a run accepted in full).

    Greedy: a proposal is accepted while it is the argmax, so the output is what plain greedy decoding gives.
    Sampling (proposals are point masses, as prompt lookup's and a greedy draft's are): proposal d is accepted with
    probability p(d), else a token is drawn from p with d removed and renormalised; each output token is thereby
    distributed as p, as without speculation. The i-th token of the run uses the random numbers of draw `draws + i`
    (`draw_generator`), and a repetition penalty sees `history` plus the run before it."""
    history = list(history or [])
    out: list[int] = []
    for i in range(len(drafts) + 1):
        row = logits[i : i + 1].float()
        row = apply_repetition_penalty(row, [history + out], params.repetition_penalty)
        generator = None if params.greedy else draw_generator(seed, draws + i)
        if i == len(drafts) or params.greedy:
            token = int(sample(row, params, generator))
            out.append(token)
            if i == len(drafts) or token != drafts[i]:
                break
            continue
        probs = filter_logits(row / params.temperature, params.top_k, params.top_p).softmax(dim=-1)[0].cpu()
        d = drafts[i]
        if float(torch.rand(1, generator=generator)) < float(probs[d]):
            out.append(d)
            continue
        residual = probs.clone()
        residual[d] = 0.0
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        break
    return out
