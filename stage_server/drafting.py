"""Speculative decoding by a draft model on the first stage's host (`layerline stage --draft PATH`), on the compute
thread. A generation loop that speculates this way (`Loop.speculate = "stage"`) feeds each round back to the first
stage as the last sampled token with `Step.propose = k`; the first stage lets its draft continue the conversation
by up to k tokens, appends them to the step as proposals (`Step.drafts`) and computes and sends the step on as if the
client had proposed them. The last stage verifies them as it verifies any proposals (`layerline.sampling.verify`),
so greedy output stays plain greedy's and sampling keeps its distribution.

The first stage knows the conversation from the steps it computes: every step carries its tokens, a rollback
(`truncate`) or a step's first position cuts what came after, and a prefix attached from the prefix cache brings
its tokens (`AttachPrefix`). Where it does not know a row's tokens (a step with padding, a gap) it proposes
nothing until the row starts again from position 0: the step then goes on without proposals, which is always
correct. Each session's draft keeps its own KV cache (`layerline.draft.DraftState`); the weights are shared.
"""

from __future__ import annotations

import torch

from layerline.draft import DraftModel, DraftState
from layerline.errors import CheckpointError
from layerline.model_source import resolve_model
from layerline.speculate import MAX_DRAFTS
from layerline.stage_server.admission import WorkItem
from layerline.stage_server.sessions import Session
from layerline.tokenizer import Tokenizer
from layerline.wire_format import int64_rows


def load_draft(name: str, model_path: str, vocab_size: int) -> StageDraft:
    """The draft `name` for a stage of the model at `model_path`, checked: the same vocabulary, token for token
    (CheckpointError naming the difference otherwise: a stage with a wrong draft does not start)."""
    try:
        draft = DraftModel(resolve_model(name))
    except (CheckpointError, OSError) as e:
        raise CheckpointError(f"--draft {name}: {e}") from None
    if resolve_model(model_path) == draft.path:
        if draft.model.config.vocab_size != vocab_size:
            raise CheckpointError(f"draft model {draft.path}: its vocabulary is not the stage's")
    else:
        try:
            tokenizer = Tokenizer.from_path(model_path)
        except CheckpointError as e:
            raise CheckpointError(f"--draft: the model's own tokenizer is needed to check the draft's: {e}") from None
        draft.check(tokenizer, vocab_size)
    return StageDraft(draft)


class StageDraft:
    def __init__(self, draft: DraftModel) -> None:
        self.draft = draft
        self.tokens_proposed = 0  # proposals made (read by Info)

    @property
    def name(self) -> str:
        return self.draft.path

    def prepare(self, item: WorkItem) -> None:
        """First stage, before the forward of a one-row step: note its tokens in the session's conversation and, when
        the step asks for proposals (`propose`), append the draft's to it (tokens, positions and `drafts` of the
        step, which then goes on as a step that carried them)."""
        session, step = item.session, item.step
        positions = item.position_rows[0] if item.position_rows is not None else item.positions[0].tolist()
        tokens = item.tokens[0].tolist() if item.tokens is not None else None
        start = positions[0]
        known = session.seen
        if tokens is None or positions != list(range(start, start + len(positions))):
            session.seen = None  # padding or a gap: the row's tokens are not known from here
            return
        if start == 0:
            known = []
        if known is None or start > len(known):
            session.seen = None
            return
        del known[start:]
        known.extend(tokens)
        session.seen = known
        want = min(step.propose, MAX_DRAFTS, session.max_length - start - len(tokens))
        if want <= 0 or step.drafts or not step.sample:
            return
        if session.draft is None:
            session.draft = DraftState(self.draft)
        proposals = session.draft.propose(known, want)
        if not proposals:
            return
        self.tokens_proposed += len(proposals)
        row = tokens + proposals
        at = list(range(start, start + len(row)))
        known.extend(proposals)  # the caches hold them until the next step's truncate rolls the rejected back
        item.tokens = item.x = torch.tensor([row], dtype=torch.int64)
        item.positions = torch.tensor([at], dtype=torch.int64)
        item.position_rows = [at]
        step.tokens.CopyFrom(int64_rows([row]))
        step.positions.CopyFrom(int64_rows([at]))
        step.drafts = len(proposals)


def forget(session: Session) -> None:
    """A session's draft state goes with it (its KV cache is the draft's memory)."""
    session.draft = None
    session.seen = None
