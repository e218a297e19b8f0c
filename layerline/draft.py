"""A draft model for speculative decoding: a small model with the chain's tokenizer, run greedily in the client's
process, proposes the next k tokens of a conversation; the chain verifies them in one pass as it verifies prompt
lookup's (`layerline.sampling.verify`). A greedy draft's proposals are point masses, so greedy output stays what
plain greedy decoding gives and sampling keeps its distribution, whatever the draft.

Each session has its own `DraftState`: the draft's KV cache and the tokens it holds. A round feeds the draft what
it lacks of the conversation (after a rejected proposal: from the first token where the conversation and its cache
part), then decodes k tokens one at a time. The weights are shared by a client's sessions; one forward pass runs at
a time. Runs in a worker thread of the client (torch blocks).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import torch

from layerline.checkpoint import load_stage, open_checkpoint
from layerline.errors import CheckpointError
from layerline.model import StageModel
from layerline.model_source import resolve_model
from layerline.tokenizer import Tokenizer

MIN_CACHE = 512  # positions a session's draft cache starts with; it doubles when a conversation outgrows it


class DraftModel:
    """The whole model at `path` (a GGUF file computes from its quantized blocks; a HF folder in float32) and its
    tokenizer. `check` refuses a draft whose tokenizer is not the chain's."""

    def __init__(self, name_or_path: str | os.PathLike) -> None:
        self.path = resolve_model(name_or_path)
        ckpt = open_checkpoint(self.path)
        try:
            self.model: StageModel = load_stage(self.path, 0, ckpt.config.num_layers, checkpoint=ckpt)
        finally:
            ckpt.close()
        try:
            self.tokenizer: Tokenizer | None = Tokenizer.from_path(self.path)
        except CheckpointError:
            self.tokenizer = None
        self.max_positions = self.model.config.max_position_embeddings
        self._lock = threading.Lock()  # one forward pass at a time over the shared weights

    def check(self, tokenizer: Tokenizer | None, vocab_size: int) -> None:
        """Raise CheckpointError unless this draft's tokens are the chain's: the same vocabulary, each token the
        same id (`tokenizer`: the stages'; `vocab_size`: the chain's logits)."""
        where = f"draft model {self.path}"
        if self.model.config.vocab_size != vocab_size:
            raise CheckpointError(
                f"{where} has a vocabulary of {self.model.config.vocab_size} tokens, the chain's has {vocab_size}"
            )
        if tokenizer is None:
            raise CheckpointError(f"{where}: the stages serve no tokenizer to check the draft's against")
        if self.tokenizer is None:
            raise CheckpointError(f"{where} has no tokenizer to check against the chain's")
        mine = self.tokenizer.backend.get_vocab(with_added_tokens=True)
        theirs = tokenizer.backend.get_vocab(with_added_tokens=True)
        if mine != theirs:
            differ = sorted(set(mine.items()) ^ set(theirs.items()))
            example = ", ".join(repr(t) for t, _ in differ[:3])
            raise CheckpointError(
                f"{where}: its tokenizer is not the chain's ({len(differ)} token/id pairs differ, e.g. {example})"
            )

    def state(self) -> DraftState:
        return DraftState(self)


class DraftState:
    """One session's draft: its KV cache and the tokens whose keys and values it holds."""

    def __init__(self, draft: DraftModel) -> None:
        self.draft = draft
        self.cache = None
        self.held: list[int] = []
        self.computed = 0  # positions the draft has computed (a cache that still holds the text computes none again)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """The draft's greedy continuation of `tokens`, `k` tokens long (fewer near the draft's position limit)."""
        tokens = list(tokens)
        k = min(k, self.draft.max_positions - len(tokens))
        if k <= 0 or not tokens:
            return []
        model = self.draft.model
        with self.draft._lock, torch.inference_mode():
            need = len(tokens) + k
            if self.cache is None or need > self.cache.max_len:
                size = MIN_CACHE
                while size < need:
                    size *= 2
                self.cache = model.new_cache(1, min(size, self.draft.max_positions))
                self.held = []
            common = 0
            for a, b in zip(self.held, tokens, strict=False):
                if a != b:
                    break
                common += 1
            common = min(common, len(tokens) - 1)  # the last token is fed again for its logits
            self.cache.truncate(0, common)
            ids = torch.tensor([tokens[common:]], dtype=torch.int64)
            out: list[int] = []
            for _ in range(k):
                logits = model(ids, cache=self.cache, last_only=True)
                self.computed += ids.shape[1]
                token = int(logits[0, -1].argmax())
                out.append(token)
                ids = torch.tensor([[token]], dtype=torch.int64)
            self.held = tokens + out[:-1]  # the last proposal's keys and values are not computed yet
            return out
