"""Admission, on the event loop: everything about an arriving step that can be checked without touching its
session's KV cache (shapes, dtypes, positions, rows, sampling settings, the generation loop it asks for), so that a
bad step is answered at once and nothing of it reaches the compute thread. The result is a `WorkItem`: the step
with its decoded tensors, what the scheduler and the compute thread work on."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from layerline import wire
from layerline.errors import BadInputError, FailedPreconditionError
from layerline.sampling import SamplingParams
from layerline.sampling_params import MAX_TOP_LOGPROBS
from layerline.speculate import MAX_DRAFTS, METHODS
from layerline.stage_server.sessions import Session
from layerline.v1 import stage_pb2

MAX_STOP_IDS = 1024


@dataclass
class WorkItem:
    step: stage_pb2.Step
    session: Session
    replies: asyncio.Queue  # the Push stream the step came on
    x: torch.Tensor  # token ids [B, T] or hidden states [B, T, hidden]
    positions: torch.Tensor  # [B, T]
    tokens: torch.Tensor | None  # [B, T]
    targets: torch.Tensor | None  # [B, T]: scoring (the log-probabilities of these tokens at the last stage)
    rows: list[int]  # session rows of the batch rows
    sampling: SamplingParams | None  # new sampler settings carried by the step (checked before anything runs)
    follow: stage_pb2.Step | None = None  # last stage, generation loop: the next step, for the first stage
    follow_address: str = ""
    admitted: float = 0.0  # perf_counter() when the step was admitted (the step latency histogram)
    position_rows: list[list[int]] | None = None  # positions as lists, for a small step (plain Python is faster)
    kv_promised: int = 0  # paged cache blocks promised to the step at admission (stage_server/kv.py)


def sampling_from_wire(msg: stage_pb2.SamplingParams) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=float(msg.temperature),
            top_k=int(msg.top_k),
            top_p=float(msg.top_p) if msg.top_p > 0 else 1.0,
            repetition_penalty=float(msg.repetition_penalty) if msg.repetition_penalty > 0 else 1.0,
            seed=int(msg.seed) if msg.HasField("seed") else None,
            logprobs=bool(msg.logprobs or msg.top_logprobs),
            top_logprobs=int(msg.top_logprobs),
        )
    except ValueError as e:
        raise BadInputError(f"sampling: {e}") from None


def admit(step: stage_pb2.Step, session: Session, replies: asyncio.Queue, label: str) -> WorkItem:
    """The step as a WorkItem of `session` (found, and owned by the step's client), or a LayerlineError naming
    what is wrong with it. `label` names this stage in messages."""
    m = session.model
    if not step.HasField("positions"):
        raise BadInputError("positions are missing")
    positions = wire.decode(step.positions, "positions", dtypes=(torch.int64,), ndim=2)
    B, T = positions.shape
    if B == 0 or T == 0:
        raise BadInputError(f"positions: empty shape {[B, T]}")
    rows_list = None
    if positions.numel() <= 64:  # a decode step: plain Python beats tensor ops here
        rows_list = positions.tolist()
        lowest, lowest_last = min(min(r) for r in rows_list), min(r[-1] for r in rows_list)
    else:
        lowest, lowest_last = int(positions.min()), int(positions[:, -1].min())
    if lowest < -1:
        raise BadInputError("positions: only -1 (padding) may be negative")
    if step.sample and lowest_last < 0:
        raise BadInputError("a step that samples needs a real token in the last column of every row")
    sampling = sampling_from_wire(step.sampling) if step.HasField("sampling") else None
    if step.HasField("loop"):
        check_loop(step)
    rows = list(step.rows)
    if rows:
        if len(rows) != B:
            raise BadInputError(f"rows: {len(rows)} given for a batch of {B}")
        if any(not 0 <= r < session.rows for r in rows) or len(set(rows)) != len(rows):
            raise BadInputError(f"rows: {rows} are not distinct rows of a session with {session.rows}")
    elif B != session.rows:
        raise BadInputError(f"a batch of {B} rows needs `rows` (the session has {session.rows})")
    else:
        rows = list(range(B))
    tokens = None
    if step.HasField("tokens"):
        tokens = wire.decode(step.tokens, "tokens", dtypes=(torch.int64, torch.int32), ndim=2)
        if tokens.shape != positions.shape:
            raise BadInputError(f"tokens have shape {list(tokens.shape)}, positions {[B, T]}")
    targets = None
    if step.HasField("targets"):
        targets = wire.decode(step.targets, "targets", dtypes=(torch.int64,), ndim=2)
        if targets.shape != positions.shape:
            raise BadInputError(f"targets have shape {list(targets.shape)}, positions {[B, T]}")
        lo, hi = int(targets.min()), int(targets.max())
        if lo < -1 or hi >= m.config.vocab_size:
            raise BadInputError(f"targets must be token ids in [0, {m.config.vocab_size}) or -1 (none)")
        if bool(((positions < 0) & (targets >= 0)).any()):
            raise BadInputError("targets: a padding position (-1) cannot have a target")
        if step.HasField("loop"):
            raise BadInputError("targets: a step that scores cannot start a generation loop")
    if step.top_logprobs > MAX_TOP_LOGPROBS:
        raise BadInputError(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {step.top_logprobs}")
    if step.drafts:
        check_drafts(step, B, T, tokens is not None, targets is not None)
    if step.propose:
        if step.propose > MAX_DRAFTS:
            raise BadInputError(f"propose: at most {MAX_DRAFTS} proposals, got {step.propose}")
        if not step.sample or B != 1 or targets is not None or step.drafts:
            raise BadInputError("propose: only a one-row step that samples, scores nothing and carries no drafts")
    if m.is_first:
        if tokens is None:
            raise BadInputError(f"{label} is the first stage: the step needs tokens")
        x = tokens
    else:
        if not step.HasField("hidden"):
            raise BadInputError(f"{label} needs hidden states")
        x = wire.decode(step.hidden, "hidden", dtypes=tuple(wire.WIRE_DTYPES.values()), ndim=3)
        if tuple(x.shape) != (B, T, m.config.hidden_size):
            raise BadInputError(
                f"hidden: shape {list(x.shape)}, expected {[B, T, m.config.hidden_size]} (batch, tokens, hidden)"
            )
    if step.sample and not m.is_last and session.next_address == "":
        raise FailedPreconditionError("nowhere to send the step")
    return WorkItem(
        step,
        session,
        replies,
        x,
        positions,
        tokens,
        targets,
        rows,
        sampling,
        admitted=time.perf_counter(),
        position_rows=rows_list,
    )


def check_loop(step: stage_pb2.Step) -> None:
    loop = step.loop
    if not step.sample:
        raise BadInputError("loop: a step that starts a generation loop must sample")
    if loop.max_new_tokens <= 0:
        raise BadInputError(f"loop: max_new_tokens must be positive, got {loop.max_new_tokens}")
    if not loop.address or not loop.session_id:
        raise BadInputError("loop: address and session_id of the first stage are required")
    if len(loop.stop_token_ids) > MAX_STOP_IDS:
        raise BadInputError(f"loop: {len(loop.stop_token_ids)} stop token ids is more than {MAX_STOP_IDS}")
    if loop.speculate not in ("", *METHODS):
        raise BadInputError(f"loop: speculate must be one of {', '.join(METHODS)} or empty, got {loop.speculate!r}")
    if loop.speculate_k > MAX_DRAFTS:
        raise BadInputError(f"loop: speculate_k {loop.speculate_k} is more than {MAX_DRAFTS}")


def check_drafts(step: stage_pb2.Step, batch: int, length: int, has_tokens: bool, has_targets: bool) -> None:
    """A step carrying proposals: one row that samples, its proposals (token ids, for the last stage to compare)
    after at least one real token, and the rollback of the step before it."""
    if not step.sample or has_targets:
        raise BadInputError("drafts: only a step that samples (and does not score) can carry proposals")
    if batch != 1:
        raise BadInputError(f"drafts: proposals are for one-row steps, this one has {batch} rows")
    if not has_tokens:
        raise BadInputError("drafts: the step needs tokens (the last stage compares the proposals with them)")
    if step.drafts >= length or step.drafts > MAX_DRAFTS:
        raise BadInputError(
            f"drafts: {step.drafts} proposals in a step of {length} tokens (at most {min(length - 1, MAX_DRAFTS)})"
        )
