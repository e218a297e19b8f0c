"""Step computation, on the compute thread: the stage's layers over a step's rows and its session's KV cache, then
either the step for the next stage or, at the last stage, sampling (and the next step of a generation loop, the
loop's end, the log-probabilities of scoring). No asyncio here: what comes out is handed back to the event loop
by the scheduler (scheduler.py)."""

from __future__ import annotations

import contextlib

import torch

from layerline import wire
from layerline.errors import BadInputError, NotFoundError
from layerline.sampling import draw_generator, sample, verify
from layerline.speculate import AdaptiveK, ngram_propose
from layerline.stage_server.admission import WorkItem
from layerline.stage_server.drafting import StageDraft
from layerline.stage_server.sessions import LoopState, Session
from layerline.v1 import stage_pb2, tensor_pb2
from layerline.wire_format import int64_rows

# What happens to each field of a Step a stage passes on (tests/test_stage_compute.py checks that every field of
# the message is named here: a new field must be decided, not forgotten)
PASSED_ON = frozenset(
    {
        "seq",
        "positions",
        "tokens",
        "rows",
        "sample",
        "sampling",
        "truncate",
        "loop",
        "looped",
        "targets",
        "client_key",
        "drafts",
        "top_logprobs",
    }
)
REPLACED = frozenset({"session_id", "hidden"})  # the next stage's session, this stage's output
# set again for what this stage sends (scheduler.mark_bursts); asked of the first stage only (drafting.py)
RESET = frozenset({"burst", "propose"})


def onward_step(step: stage_pb2.Step, next_session_id: str, hidden: tensor_pb2.Tensor) -> stage_pb2.Step:
    """The step for the next stage: every field of `step` but those REPLACED (and RESET, cleared)."""
    step.ClearField("hidden")  # computed: its bytes need not be copied (the input tensor keeps its own reference)
    onward = stage_pb2.Step()
    onward.CopyFrom(step)
    onward.session_id = next_session_id
    onward.hidden.CopyFrom(hidden)
    for name in RESET:
        onward.ClearField(name)
    return onward


class StepCompute:
    """What the compute thread (and the event loop, for a step the scheduler computes inline) runs for admitted
    steps. Its counters (tokens sampled, proposals verified and accepted) are written by whichever runs it and read
    by Info."""

    def __init__(self, drafter: StageDraft | None = None) -> None:
        self.drafter = drafter  # the draft model of this host (--draft): proposals for steps that ask (`propose`)
        self.tokens_sampled = 0
        self.tokens_drafted = 0  # proposals verified (speculative decoding) ...
        self.tokens_accepted = 0  # ... and accepted

    def one(self, item: WorkItem) -> tuple[stage_pb2.Step | stage_pb2.Result | None, Exception | None]:
        if item.session.closed:
            return None, None
        try:
            return self.compute(item), None
        except Exception as e:
            return None, e

    def batch(self, batch: list[WorkItem]) -> list[tuple]:
        """One forward pass for several sessions' steps; if it fails (one bad step), each runs alone so that only
        the bad one fails."""
        try:
            parts = [(it.x, it.positions, cache_of(it), it.rows) for it in batch]
            with contextlib.ExitStack() as held:
                for _, _, cache, _ in parts:
                    held.enter_context(cache.in_use())
                before = [cache.promised for _, _, cache, _ in parts]
                try:
                    outs = batch[0].session.model.forward_many(parts, last_only=batch[0].step.sample)
                finally:
                    for it, (_, _, cache, _), b in zip(batch, parts, before, strict=True):
                        cache.end_promise(it.kv_promised - (b - cache.promised))
                        it.kv_promised = 0
                for it, (_, _, cache, _) in zip(batch, parts, strict=True):
                    cache.note_tokens(it.rows, it.tokens, it.position_rows or it.positions)
        except Exception:
            return [self.one(it) for it in batch]
        results = []
        for it, out in zip(batch, outs, strict=True):
            try:
                results.append((self.finish(it, out), None))
            except Exception as e:
                results.append((None, e))
        return results

    def compute(self, item: WorkItem) -> stage_pb2.Step | stage_pb2.Result | None:
        """On the compute thread: the stage's layers for one step, then sampling (last stage) or the wire message
        for the next stage."""
        step, session = item.step, item.session
        cache = cache_of(item)
        with cache.in_use():
            if step.HasField("truncate"):
                for r in item.rows:
                    if not 0 <= step.truncate <= cache.lengths[r]:
                        raise BadInputError(
                            f"truncate: row {r} holds {cache.lengths[r]} positions, cannot keep {step.truncate}"
                        )
                for r in item.rows:
                    cache.truncate(r, step.truncate)
                    if session.sampler is not None:
                        del session.sampler.history[r][step.truncate :]
            if self.drafter is not None and session.rows == 1 and session.model.is_first:
                self.drafter.prepare(item)  # may append the draft's proposals to the step
            last_only = step.sample and item.targets is None and not step.drafts
            before = cache.promised
            try:
                out = session.model(
                    item.x, item.positions, cache, item.rows, last_only=last_only, decode_columns=step.drafts > 0
                )
            finally:  # the blocks promised to the step and not taken go back
                cache.end_promise(item.kv_promised - (before - cache.promised))
                item.kv_promised = 0
            cache.note_tokens(
                item.rows, item.tokens, item.position_rows or item.positions
            )  # the prefix index seals the full blocks
        return self.finish(item, out)

    def finish(self, item: WorkItem, out: torch.Tensor) -> stage_pb2.Step | stage_pb2.Result | None:
        """After the forward pass: the message for the next stage, or (last stage) sampling and the loop."""
        step, session = item.step, item.session
        if not session.model.is_last:
            to = session.wire_dtype
            host = session.model.staging.to_host(out, None if to == torch.int8 else to)
            hidden = wire.encode(host, to)
            return onward_step(step, session.next_session_id, hidden)
        sampler = session.sampler
        if item.sampling is not None:
            sampler.params, sampler.seed, sampler.draws = (
                item.sampling,
                item.sampling.base_seed(),
                item.step.sampling.draws,
            )
        drafts = step.drafts  # proposals join the history only as they are accepted
        if item.tokens is not None:
            if item.position_rows is not None:
                token_rows = item.tokens.tolist()
                for b, r in enumerate(item.rows):
                    real = len(token_rows[b]) - drafts
                    sampler.history[r].extend(
                        t for t, p in zip(token_rows[b][:real], item.position_rows[b][:real], strict=True) if p >= 0
                    )
            else:
                real = item.tokens.shape[1] - drafts
                for b, r in enumerate(item.rows):
                    valid = item.positions[b, :real] >= 0
                    sampler.history[r].extend(item.tokens[b, :real][valid].tolist())
        loop = None
        if step.HasField("loop"):
            spec = step.loop
            loop = session.loop = LoopState(
                spec.address,
                spec.session_id,
                frozenset(spec.stop_token_ids),
                {r: spec.max_new_tokens for r in item.rows},
                step.seq,
                speculate=spec.speculate if session.rows == 1 else "",
                k=AdaptiveK.of(spec.speculate, spec.speculate_k or None),
            )
        elif step.looped and session.loop is not None:
            loop = session.loop
            if loop.halted:  # the step that was travelling when Halt came: computed, nothing more sampled
                session.loop = None
                return loop_done(session, stage_pb2.Result(seq=loop.seq, rows=item.rows), unverified=drafts)
        if not step.sample:
            if item.targets is None:
                return None
            result = stage_pb2.Result(seq=step.seq, rows=item.rows)
            scored(result, out, item.targets, step.top_logprobs)
            return result
        if drafts:  # one row: verify the proposals, answer the accepted run and one token more
            r = item.rows[0]
            proposals = item.tokens[0, -drafts:].tolist()
            run = verify(
                out[0, -(drafts + 1) :], proposals, sampler.params, sampler.seed, sampler.draws, sampler.history[r]
            )
            sampler.draws += len(run)
            sampler.history[r].extend(run[:-1])
            self.tokens_drafted += drafts
            self.tokens_accepted += len(run) - 1
            runs = [run]
            result = stage_pb2.Result(seq=step.seq, token_ids=run, rows=item.rows, drafted=drafts)
        else:
            generator = None if sampler.params.greedy else draw_generator(sampler.seed, sampler.draws)
            sampler.draws += 1
            ids = sample(out[:, -1], sampler.params, generator, [sampler.history[r] for r in item.rows]).tolist()
            runs = [[t] for t in ids]
            result = stage_pb2.Result(seq=step.seq, token_ids=ids, rows=item.rows)
        self.tokens_sampled += sum(len(run) for run in runs)
        if item.targets is not None:
            scored(result, out, item.targets, step.top_logprobs)
        if loop is not None:
            self._continue_loop(item, loop, runs, result)
        if sampler.params.logprobs:  # of the tokens the Result still carries (a loop cuts a run at its end)
            n = len(result.token_ids)
            at = out[0, out.shape[1] - drafts - 1 :][:n] if drafts else out[:, -1]
            sampled_logprobs(result, at, sampler.params.top_logprobs)
        return result

    def _continue_loop(self, item: WorkItem, loop: LoopState, runs: list[list[int]], result: stage_pb2.Result) -> None:
        """Last stage, compute thread: the rows that go on become the next step for the first stage. A row's run
        is the token it sampled, or a verified step's accepted proposals and one token more; with speculation the
        next step carries new proposals (prompt lookup over the row's history)."""
        session, rows = item.session, []
        drafts = item.step.drafts
        ends = [r[-1] for r in item.position_rows] if item.position_rows is not None else item.positions[:, -1].tolist()
        starts = []  # where each going row's next step begins: after its last accepted position
        for b, r in enumerate(item.rows):
            run = runs[b]
            cut = min(len(run), loop.remaining[r])  # never more tokens than asked
            stop = next((j + 1 for j, t in enumerate(run[:cut]) if t in loop.stop_ids), 0)
            if stop or cut < len(run):
                del run[stop or cut :]
                if len(runs) == 1:
                    del result.token_ids[stop or cut :]
            loop.remaining[r] -= len(run)
            start = ends[b] - drafts + len(run)
            if stop or loop.remaining[r] <= 0 or start >= session.max_length:
                del loop.remaining[r]
            else:
                rows.append(b)
                starts.append(start)
        if drafts:
            loop.k.update(drafts, len(runs[0]) - 1)
        if not rows or loop.halted:
            session.loop = None
            loop_done(session, result, unverified=drafts - (len(runs[0]) - 1) if drafts else 0)
            return
        if loop.speculate:  # one row
            r, start, token = item.rows[0], starts[0], runs[0][-1]
            k = min(loop.k.k, loop.remaining[r] - 1, session.max_length - start - 1)
            by_stage = loop.speculate == "stage"  # the first stage's draft proposes (drafting.py)
            proposals = ngram_propose(session.sampler.history[r] + [token], k) if k > 0 and not by_stage else []
            item.follow = stage_pb2.Step(
                session_id=loop.first_id,
                seq=loop.seq,
                positions=int64_rows([list(range(start, start + 1 + len(proposals)))]),
                tokens=int64_rows([[token, *proposals]]),
                rows=[r],
                sample=True,
                looped=True,
                client_key=session.owner,
                drafts=len(proposals),
                propose=max(k, 0) if by_stage else 0,
            )
            if drafts > len(runs[0]) - 1:  # the caches hold rejected proposals: roll them back first
                item.follow.truncate = start
        else:
            item.follow = stage_pb2.Step(
                session_id=loop.first_id,
                seq=loop.seq,
                positions=wire.int64_column(starts),
                tokens=wire.int64_column([runs[b][-1] for b in rows]),
                rows=[item.rows[b] for b in rows],
                sample=True,
                looped=True,
                client_key=session.owner,
            )
        item.follow_address = loop.address


def cache_of(item: WorkItem):
    cache = item.session.cache
    if cache is None:
        raise NotFoundError("the session was closed")
    return cache


def loop_done(session: Session, result: stage_pb2.Result, unverified: int = 0) -> stage_pb2.Result:
    """The loop's final Result: `lengths` are the positions the rows' caches hold that count (a one-row session's
    cache may hold `unverified` rejected or unchecked proposals past them, which the next step rolls back)."""
    result.done = True
    result.lengths.extend(session.cache.lengths[r] - unverified for r in range(session.rows))
    return result


def scored(result: stage_pb2.Result, logits: torch.Tensor, targets: torch.Tensor, top: int = 0) -> None:
    """A scoring step's answer: the [B, T] float32 log-probabilities of `targets` under `logits` [B, T, vocab] (0
    where the target is -1) and, with `top`, the `top` most likely tokens at each [B, T, top] (0 / id 0 where the
    target is -1). One row at a time, so that only one row's log-softmax is ever held besides the logits."""
    B, T = targets.shape
    out = torch.zeros(targets.shape, dtype=torch.float32)
    top_ids = torch.zeros((B, T, top), dtype=torch.int64)
    top_lp = torch.zeros((B, T, top), dtype=torch.float32)
    for b in range(B):
        cols = (targets[b] >= 0).nonzero().flatten()
        if len(cols):
            lp = torch.log_softmax(logits[b, cols].float(), dim=-1)
            out[b, cols] = lp.gather(1, targets[b, cols, None]).flatten()
            if top:
                values, ids = lp.topk(top, dim=-1)
                top_lp[b, cols], top_ids[b, cols] = values, ids
    result.logprobs.CopyFrom(wire.encode(out))
    if top:
        result.top_ids.CopyFrom(wire.encode(top_ids))
        result.top_logprobs.CopyFrom(wire.encode(top_lp))


def sampled_logprobs(result: stage_pb2.Result, logits: torch.Tensor, top: int) -> None:
    """The log-probabilities of the Result's sampled tokens under `logits` [n, vocab] (the logits each was sampled
    from, as the model gave them), and with `top` the `top` most likely tokens at each."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(result.token_ids), dtype=torch.int64)
    result.token_logprobs.CopyFrom(wire.encode(lp.gather(1, ids[:, None]).flatten().contiguous()))
    if top:
        values, top_ids = lp.topk(top, dim=-1)
        result.top_ids.CopyFrom(wire.encode(top_ids.contiguous()))
        result.top_logprobs.CopyFrom(wire.encode(values.contiguous()))
