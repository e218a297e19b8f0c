"""Micro-batch flows of the client: `generate_batch` (the new tokens of many prompts) and `score` (per-token
log-probabilities of given sequences), GPipe-style.

The batch is cut into micro-batches of `micro_batch_size` rows; each micro-batch is one session with that many rows
on every stage, its sequences left-padded to one length (padding has position -1 and is masked out), so each row
computes exactly what it would alone. All micro-batches are pushed back to back (at most the client's
`max_in_flight` at once) and the call returns when all are done: while stage 2 computes micro-batch 1, stage 1
computes micro-batch 2, so every stage is busy. Generation runs each micro-batch as one generation loop on the
stages (rows leave it at their stop token or length); scoring sends `targets` and the last stage answers with the
log-probability of each target instead of sampling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from layerline.client.errors import RPCError
from layerline.client.session import AsyncSession
from layerline.client.types import Generation, Options, Scores
from layerline.errors import BadInputError
from layerline.text_stream import TextStream
from layerline.v1 import stage_pb2, tensor_pb2
from layerline.wire_format import flat_values, float32_rows, int64_rows

if TYPE_CHECKING:
    from layerline.client.aio import AsyncClient

logger = logging.getLogger(__name__)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def float32_matrix(msg: tensor_pb2.Tensor, shape: tuple[int, int]) -> list[list[float]]:
    """A [B, T] float32 wire tensor as lists (checked: this comes from the network)."""
    try:
        return float32_rows(msg, "logprobs", shape)
    except BadInputError as e:
        raise RPCError(
            grpc.StatusCode.INTERNAL, f"the last stage sent log-probabilities that do not fit: {e}"
        ) from None


def left_padded(seqs: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids and positions of sequences left-padded to the longest (padding: token 0, position -1)."""
    longest = max(len(s) for s in seqs)
    tokens = [[0] * (longest - len(s)) + list(s) for s in seqs]
    positions = [[-1] * (longest - len(s)) + list(range(len(s))) for s in seqs]
    return tokens, positions, longest


def micro_batches(n: int, size: int) -> list[range]:
    if size < 1:
        raise RPCError(INVALID, f"micro_batch_size must be at least 1, got {size}")
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


async def run_micro_batches(client: AsyncClient, items: list, size: int, one) -> list:
    """`one(client, part)` on each micro-batch of `items`, all started at once (the client's in-flight bound lets
    `max_in_flight` run); results in the order of `items`."""
    parts = [[items[i] for i in r] for r in micro_batches(len(items), size)]

    async def bounded(part: list) -> list:
        async with client.in_flight():
            moved = 0
            while True:
                links = await client.links()
                try:
                    return await one(client, part)
                except RPCError as e:
                    # nothing of a micro-batch reached the caller yet: it runs again, whole, on another chain
                    if not client.may_fail_over(e, moved):
                        raise
                    moved += 1
                    await client.move(e, links, f"a micro-batch of {len(part)} rows", sum(len(p) for p in part))

    tasks = [asyncio.ensure_future(bounded(p)) for p in parts]
    try:
        done = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their sessions are closed before this returns
        raise
    return [x for part in done for x in part]


async def generate_micro_batch(client: AsyncClient, prompts: list[list[int]], opts: Options) -> list[Generation]:
    """Generate for the prompts of one micro-batch, as one session with a row per prompt."""
    longest = max(len(p) for p in prompts)
    max_length = await client.fit(longest + opts.max_new_tokens)
    if longest >= max_length:
        raise RPCError(
            grpc.StatusCode.OUT_OF_RANGE, f"a prompt of {longest} tokens leaves no room in the model's context"
        )
    tok = await client.tokenizer()
    stop_ids = opts.stop_token_ids if opts.stop_token_ids is not None else (tok.eos_token_ids if tok else ())
    streams = [
        TextStream(tok.stream_decoder(skip_special_tokens=True) if tok else None, opts.stop, stop_ids) for _ in prompts
    ]
    outs: list[list[int]] = [[] for _ in prompts]
    use_loop = client.config.server_loop
    tokens, positions, _ = left_padded(prompts)
    async with AsyncSession(client, max_length, rows=len(prompts)) as s:
        # the prompts in column chunks; the last chunk samples and (server loop) starts the generation loop
        width = len(tokens[0])
        for c0 in range(0, width, s._chunk):
            last = c0 + s._chunk >= width
            step = stage_pb2.Step(
                session_id=s.ids[0],
                positions=int64_rows([p[c0 : c0 + s._chunk] for p in positions]),
                tokens=int64_rows([t[c0 : c0 + s._chunk] for t in tokens]),
                sample=last,
            )
            if last:
                step.sampling.CopyFrom(opts.sampling())
                if use_loop:
                    step.loop.CopyFrom(
                        stage_pb2.Loop(
                            address=s.links[0].address,
                            session_id=s.ids[0],
                            max_new_tokens=opts.max_new_tokens,
                            stop_token_ids=list(stop_ids),
                        )
                    )
            seq = await s._write(step)
        halted = False
        while True:
            result = await s._wait(seq)
            for r, t in zip(result.rows, result.token_ids, strict=True):
                if not 0 <= r < len(prompts) or streams[r].finish_reason:
                    continue
                outs[r].append(int(t))
                at_limit = len(outs[r]) >= opts.max_new_tokens or len(prompts[r]) + len(outs[r]) >= max_length
                streams[r].push(int(t), at_limit)
            running = [r for r in range(len(prompts)) if not streams[r].finish_reason]
            if use_loop:
                if result.done:
                    break
                if not running and not halted:  # every row met a stop string: the loop need not go on
                    await s._halt()
                    halted = True
                continue
            if not running:
                break
            step = stage_pb2.Step(
                session_id=s.ids[0],
                positions=int64_rows([[len(prompts[r]) + len(outs[r]) - 1] for r in running]),
                tokens=int64_rows([[outs[r][-1]] for r in running]),
                rows=running,
                sample=True,
            )
            seq = await s._write(step)
    for st in streams:
        st.end("length")  # rows the stages ended at the session's length
    return [
        Generation(st.text, out, list(p), st.finish_reason or "length")
        for st, out, p in zip(streams, outs, prompts, strict=True)
    ]


async def score_micro_batch(client: AsyncClient, seqs: list[list[int]], top: int = 0) -> list[Scores]:
    """Per-token log-probabilities of the sequences of one micro-batch (one session, a row per sequence), and with
    `top` the `top` most likely tokens at each position."""
    tokens, positions, longest = left_padded(seqs)
    limit = await client.fit(longest)
    if longest > limit:
        raise RPCError(
            grpc.StatusCode.OUT_OF_RANGE, f"a sequence of {longest} tokens is longer than the model's context {limit}"
        )
    # the target of each real position is the next token of its row (none for the row's last token)
    targets = [[-1] * longest for _ in seqs]
    for b, s_ in enumerate(seqs):
        pad = longest - len(s_)
        for i in range(len(s_) - 1):
            targets[b][pad + i] = s_[i + 1]
    got: list[list[float]] = [[] for _ in seqs]
    alternatives: list[list[tuple[tuple[int, float], ...]]] = [[] for _ in seqs]
    async with AsyncSession(client, longest, rows=len(seqs)) as s:
        sent = []
        for c0 in range(0, longest, s._chunk):
            cols = slice(c0, c0 + s._chunk)
            step = stage_pb2.Step(
                session_id=s.ids[0],
                positions=int64_rows([p[cols] for p in positions]),
                tokens=int64_rows([t[cols] for t in tokens]),
                targets=int64_rows([t[cols] for t in targets]),
                top_logprobs=top,
            )
            sent.append((await s._write(step), step.positions.shape[1]))
        for seq, width in sent:  # results come back in the order the steps went in
            result = await s._wait(seq)
            for b, row in enumerate(float32_matrix(result.logprobs, (len(seqs), width))):
                got[b].extend(row)
            if top:
                B = len(seqs)
                try:
                    ids = flat_values(result.top_ids, "top_ids", tensor_pb2.INT64, [B, width, top])
                    lps = flat_values(result.top_logprobs, "top_logprobs", tensor_pb2.FLOAT32, [B, width, top])
                except BadInputError as e:
                    raise RPCError(grpc.StatusCode.DATA_LOSS, f"scores: {e}", s.links[-1].address) from None
                for b in range(B):
                    for t in range(width):
                        at = (b * width + t) * top
                        alternatives[b].append(tuple(zip(ids[at : at + top], lps[at : at + top], strict=True)))
    return [
        Scores(got[b][longest - len(s_) : longest - 1], alternatives[b][longest - len(s_) : longest - 1] if top else [])
        for b, s_ in enumerate(seqs)
    ]
