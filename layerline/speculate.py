"""Speculative decoding's proposals, without torch (the client and the last stage both use it): prompt lookup, which
proposes the tokens that followed the last occurrence of the text's last few tokens, the adaptive number of
proposals per round, and the check of the settings (a draft model, which proposes instead, is `layerline.draft`).

A round sends the last sampled token and k proposals through the chain as one (k + 1)-token step; the last stage
verifies them against its logits (`layerline.sampling.verify`) and answers the accepted run plus one token, so a
round costs one pass through the pipeline however many tokens it yields. Every stage rolls its KV cache back past
the rejected proposals when the next step arrives (`Step.truncate`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from layerline.model_source import EMBEDDED_MODELS

# proposers by name: "ngram" (prompt lookup, by the last stage or the client), "stage" (the draft model the first
# stage's host runs: `layerline stage --draft`); anything else names a draft model the client runs
METHODS = ("ngram", "stage")
MAX_DRAFTS = 16  # proposals one step may carry (its columns then take the decode kernel: quant/decode.py)
START_K = 4  # an adaptive k's first value
MAX_NGRAM = 8  # the longest tail prompt lookup matches: a longer tail tells copied text from a chance repeat


def ngram_propose(tokens: Sequence[int], k: int, max_n: int = MAX_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the last n tokens of `tokens` (n from
    `max_n` down to 1: the longest tail that occurred before wins); [] when no tail occurred before. A tail of n
    tokens earns at most n * n proposals: one shared token is weak evidence of a copy (a proposal rejected costs a
    column of compute on every stage), three or more are strong."""
    total = len(tokens)
    if k <= 0 or total < 2:
        return []
    tokens = list(tokens)
    longest = min(max_n, total - 1)
    last = tokens[-1]
    best_n, best_end = 0, -1
    # one pass over the earlier occurrences of the last token, most recent first: the tail each one ends
    for end in range(total - 2, -1, -1):
        if tokens[end] != last:
            continue
        n = 1
        while n < longest and n <= end and tokens[end - n] == tokens[total - 1 - n]:
            n += 1
        if n > best_n:  # longer than any more recent one
            best_n, best_end = n, end
            if n == longest:
                break
    if not best_n:
        return []
    return tokens[best_end + 1 : best_end + 1 + min(k, best_n * best_n)]


@dataclass
class AdaptiveK:
    """Proposals per round: a fixed `k`, or (fixed None) one that doubles while every proposal is accepted, halves
    when none is, and becomes accepted + 2 when some are, between 1 and `hi`."""

    fixed: int | None = None
    hi: int = MAX_DRAFTS
    k: int = START_K

    def __post_init__(self) -> None:
        if self.fixed is not None:
            self.k = self.fixed

    @classmethod
    def of(cls, method: str | None, fixed: int | None) -> AdaptiveK:
        """The k of a generation that speculates by `method`: prompt lookup starts at the most proposals, as its
        own rule already bounds them by the tail it matched; a draft model starts at START_K."""
        return cls(fixed=fixed, k=MAX_DRAFTS if method == "ngram" else START_K)

    def update(self, proposed: int, accepted: int) -> None:
        if self.fixed is not None or proposed == 0:
            return
        if accepted >= proposed:
            self.k = min(self.hi, self.k * 2)
        elif accepted == 0:
            self.k = max(1, self.k // 2)
        else:
            self.k = max(1, min(self.hi, accepted + 2))


def is_draft(method: str | None) -> bool:
    """Whether `method` names a draft model (a path, or an embedded model such as `smollm2`) rather than a
    proposer by name; a draft runs in the client (`layerline.draft`)."""
    return bool(method) and method not in METHODS


def check(method: str | None, k: int | None) -> list[str]:
    """What is wrong with these speculation settings (empty: nothing)."""
    problems = []
    if is_draft(method) and method not in EMBEDDED_MODELS and not os.path.exists(method):  # type: ignore[arg-type]
        known = ", ".join([*METHODS, *EMBEDDED_MODELS])
        problems.append(f"speculate must be {known} or a draft model's path, got {method!r} (no such file)")
    if k is not None and not 1 <= k <= MAX_DRAFTS:
        problems.append(f"speculate_k must be in [1, {MAX_DRAFTS}] (or None: adaptive), got {k}")
    return problems
