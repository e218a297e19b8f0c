"""A session: one conversation (or one micro-batch's rows) held in the KV caches of a chain of stages, and the
generation that runs in it. Runs on the client's event loop; everything network-wide (routes, failure location,
the move to another chain) it asks its AsyncClient for (aio.py).

A generation goes through these states (`Phase`):
- SETTLING: a previous generation's server loop may still run on the stages; its last results are read (or the
  chain found dead) before anything new is sent.
- FEEDING: the tokens the stages' caches lack (the new prompt, or after a move the whole conversation) go in
  chunks; the last chunk samples the first token and, with a server loop, starts it.
- STREAMING: tokens come back one by one; without a server loop this client sends each one back itself.
- MOVING: the chain failed; the session is opened on another chain (`AsyncClient.move`), then FEEDING again.
- DONE: a stop token, a stop string, max_new_tokens or max_length; a loop still running is halted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from layerline.client.errors import RPCError
from layerline.client.types import INVALID, Generation, Link, Options, Piece
from layerline.errors import BadInputError
from layerline.grpc_status import code_from_int
from layerline.speculate import AdaptiveK, is_draft, ngram_propose
from layerline.text_stream import TextStream
from layerline.v1 import stage_pb2, tensor_pb2
from layerline.wire_format import flat_values, int64_rows

if TYPE_CHECKING:
    from layerline.client.aio import AsyncClient


class Phase(enum.Enum):
    """Where a session's generation is (see the module docstring); IDLE between generations."""

    IDLE = "idle"
    SETTLING = "settling"
    FEEDING = "feeding"
    STREAMING = "streaming"
    MOVING = "moving"
    DONE = "done"


class AsyncSession:
    """A conversation held in the stages' KV caches. Use `async with`; `generate` and `chat` continue it."""

    def __init__(self, client: AsyncClient, max_length: int | None, rows: int = 1) -> None:
        self.client = client
        self.max_length = max_length
        self.rows = rows  # sequences in the session: 1 for a conversation, a micro-batch's size in generate_batch
        self.ids: list[str] = []
        self.links: list[Link] = []  # the chain the session is open on
        self.failovers = 0  # times the session moved to another chain
        self.history: list[int] = []  # every token of the conversation, prompts and generated
        self.fed = 0  # how many of them the stages' caches hold
        self.last: Generation | None = None
        self.phase = Phase.IDLE  # of the generation running (or the last one)
        self._seq = 0
        self._inflight: int | None = None  # a step (or server loop) whose results were not all read yet
        self._looping = False  # the last stage runs a generation loop for this session (no `done` seen yet)
        self._halting: asyncio.Future | None = None  # a Halt call under way
        self._push: grpc.aio.StreamStreamCall | None = None
        self._sub: grpc.aio.UnaryStreamCall | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._busy = asyncio.Lock()
        self._chunk = 1
        self._spill = False  # the stages' caches may hold positions past `fed` (proposals of speculative decoding)
        self.drafted = 0  # proposals this session's client loop sent (speculative decoding) ...
        self.accepted = 0  # ... and the last stage accepted
        self._draft: Any = None  # a draft model's state for this conversation (layerline.draft.DraftState)

    async def __aenter__(self) -> AsyncSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        attempt = 0
        while True:
            try:
                await self._open_on(await self.client.links())
                return
            except RPCError as e:
                # a stage of the chain serves other layers now (the coordinator re-planned since this client got
                # its route): ask for the new route and open there
                if e.code != grpc.StatusCode.ABORTED or not self.client.coordinator:
                    raise
                if attempt >= self.client.config.route_retries:
                    raise
                self.client.forget_route()
                await asyncio.sleep(0.25 * 2**attempt)
                attempt += 1

    async def _open_on(self, links: list[Link]) -> None:
        limit = min(link.info.max_length or 1 << 30 for link in links)
        self.max_length = self.max_length or min(limit, 4096)
        cfg = self.client.config
        t = tensor_pb2
        wire = {"": 0, "float32": t.FLOAT32, "float16": t.FLOAT16, "bfloat16": t.BFLOAT16, "int8": t.INT8_ROWS}.get(
            cfg.wire_dtype
        )
        if wire is None:
            raise RPCError(INVALID, f"wire_dtype {cfg.wire_dtype!r} is not float32, float16, bfloat16 or int8")
        # prompt chunks small enough that the hidden states of one chunk fit every stage's message limit
        limit = min(
            [cfg.max_message_bytes] + [link.info.max_message_bytes for link in links if link.info.max_message_bytes]
        )
        itemsize = {t.FLOAT16: 2, t.BFLOAT16: 2, t.INT8_ROWS: 1}.get(wire, 4)  # stage defaults: assume float32
        per_token = (itemsize * links[0].info.hidden_size + 64) * self.rows  # + positions, token id, framing
        self._chunk = max(1, min(cfg.prefill_chunk, int(limit * 0.8) // per_token))
        ids = [""] * len(links)
        try:
            # last stage first: each stage must know the session's id at the next one
            for i in reversed(range(len(links))):
                req = stage_pb2.OpenSessionRequest(
                    max_length=self.max_length,
                    rows=self.rows,
                    wire_dtype=wire,
                    client_key=self.client.client_key,
                    start_layer=links[i].info.start_layer,
                    end_layer=links[i].info.end_layer,
                )
                if i + 1 < len(links):
                    req.next_address, req.next_session_id = links[i + 1].address, ids[i + 1]
                try:
                    resp = await links[i].stub.OpenSession(req, timeout=cfg.connect_timeout)
                except grpc.aio.AioRpcError as e:
                    raise RPCError.from_grpc(e, links[i].address) from None
                ids[i] = resp.session_id
        except BaseException:
            await _close_on(links, ids, self.client.client_key, cfg.connect_timeout)
            raise
        self.ids, self.links = ids, links
        self.client._sessions.add(self)
        self._push = links[0].stub.Push()
        self._sub = links[-1].stub.Subscribe(
            stage_pb2.SubscribeRequest(session_id=ids[-1], client_key=self.client.client_key)
        )
        self._tasks = [
            asyncio.create_task(self._pump(self._push, "reply", links[0].address)),
            asyncio.create_task(self._pump(self._sub, "result", links[-1].address)),
        ]

    async def _pump(self, call: grpc.aio.StreamStreamCall | grpc.aio.UnaryStreamCall, kind: str, address: str) -> None:
        events = self._events  # this chain's: a failover gives the next chain a queue of its own
        try:
            async for msg in call:
                events.put_nowait((kind, msg))
            events.put_nowait(("broken", RPCError(grpc.StatusCode.UNAVAILABLE, f"{address} ended the stream")))
        except grpc.aio.AioRpcError as e:
            if not self._closed:
                events.put_nowait(("broken", RPCError.from_grpc(e, address)))
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        """Free the session's KV cache on every stage (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.client._sessions.discard(self)
        if self._halting is not None:  # the sessions are closed below, which ends any loop anyway
            self._halting.cancel()
            with contextlib.suppress(BaseException):
                await self._halting
        await self._drop(self.client.config.connect_timeout)

    async def _drop(self, timeout: float) -> None:
        """Stop the session's streams and close it on its stages (those that answer within `timeout`)."""
        for task in self._tasks:
            task.cancel()
        for call in (self._push, self._sub):
            if call is not None:
                call.cancel()
        if self.ids:
            await _close_on(self.links, self.ids, self.client.client_key, timeout)

    async def _fail_over(self, error: RPCError) -> None:
        """Move the session to another chain (see the module docstring); the caller then replays its tokens."""
        if self._halting is not None:
            self._halting.cancel()
            with contextlib.suppress(BaseException):
                await self._halting
        old, what = self.links, f"session {self.ids[0][:8] if self.ids else '?'}"
        await self._drop(self.client.config.probe_timeout)
        self.ids, self._push, self._sub, self._tasks = [], None, None, []
        self._events = asyncio.Queue()
        self._inflight, self._looping, self._halting = None, False, None
        self.fed, self._spill = 0, False
        links = await self.client.move(error, old, what, len(self.history))
        await self._open_on(links)
        self.failovers += 1

    # ---- generation ----------------------------------------------------------------------------------------------

    def generate(
        self, prompt: str | Sequence[int], *, stream: bool = True, **options: Any
    ) -> AsyncIterator[Piece] | Awaitable[Generation]:
        """Continue the conversation with `prompt` (text or ids) and generate."""
        opts = Options.make(**options)
        pieces = self._from_prompt(prompt, opts)
        return pieces if stream else self._gather(pieces)

    def chat(
        self, messages: list[dict[str, Any]], *, stream: bool = True, **options: Any
    ) -> AsyncIterator[Piece] | Awaitable[Generation]:
        """`messages` is the whole conversation so far (the model's answers included); only what the stages do not
        hold yet is sent. Where the template renders earlier turns differently from what was generated, the
        stages roll back to the common prefix."""
        opts = Options.make(**options)
        pieces = self._from_messages(messages, opts)
        return pieces if stream else self._gather(pieces)

    async def _gather(self, pieces: AsyncIterator[Piece]) -> Generation:
        async for _ in pieces:
            pass
        assert self.last is not None
        return self.last

    async def _from_prompt(self, prompt: str | Sequence[int], opts: Options) -> AsyncIterator[Piece]:
        ids = await self.client._prompt_ids(prompt, None, first=not self.history)
        async with contextlib.aclosing(self._generate(ids, opts)) as pieces:
            async for piece in pieces:
                yield piece

    async def _from_messages(self, messages: list[dict[str, Any]], opts: Options) -> AsyncIterator[Piece]:
        rendered = await self.client._prompt_ids(None, messages)
        common = 0
        for a, b in zip(rendered, self.history, strict=False):
            if a != b:
                break
            common += 1
        async with contextlib.aclosing(self._generate(rendered[common:], opts, keep=common)) as pieces:
            async for piece in pieces:
                yield piece

    async def _generate(
        self, new_ids: list[int], opts: Options, keep: int | None = None, slot: bool = True
    ) -> AsyncIterator[Piece]:
        """Feed what the stages do not hold yet (the last generated token, then `new_ids`), then decode: with the
        server loop the last stage feeds each token back to the first itself and this only reads results. A stage
        failure moves the session to another chain and the generation goes on there (`_fail_over`)."""
        if self._closed or not self.ids:
            raise RPCError(grpc.StatusCode.FAILED_PRECONDITION, "the session is not open")
        async with self._busy, self.client.in_flight() if slot else contextlib.nullcontext():
            moved = 0

            async def move(error: RPCError) -> None:  # MOVING: to another chain, or the error reaches the caller
                nonlocal moved
                self.phase = Phase.MOVING
                if self._closed or not self.client.may_fail_over(error, moved):
                    raise error
                moved += 1
                await self._fail_over(error)

            self.phase = Phase.SETTLING
            try:
                await self._settle()
            except RPCError as e:  # the previous generation's stages are gone: start this one elsewhere
                await move(e)
            truncate = None
            if keep is not None and keep < len(self.history):
                self.history = self.history[:keep]
            if self.fed > len(self.history):
                truncate = self.fed = len(self.history)
            prompt_ids = list(new_ids)
            if not self.history[self.fed :] + prompt_ids:
                raise RPCError(INVALID, "the prompt is empty")
            tok = await self.client.tokenizer()
            vocab = self.links[0].info.vocab_size
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise RPCError(INVALID, f"token ids must be in [0, {vocab})")
            needed = len(self.history) + len(prompt_ids)
            if needed > self.max_length:  # type: ignore[operator]
                raise RPCError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"the conversation needs {needed} positions but the session's max_length is {self.max_length}",
                )
            self.history.extend(prompt_ids)
            opts = opts.seeded()
            stop_ids = opts.stop_token_ids if opts.stop_token_ids is not None else (tok.eos_token_ids if tok else ())
            decoder = tok.stream_decoder(skip_special_tokens=True) if tok else None
            stream = TextStream(decoder, opts.stop, stop_ids)
            out_ids: list[int] = []
            run: list[tuple[int, float | None, tuple]] = []  # the last step's (or loop round's) tokens, not streamed
            scores: list[float] = []  # with logprobs: each streamed token's log-probability ...
            alternatives: list[tuple[tuple[int, float], ...]] = []  # ... and its most likely alternatives
            seq = 0
            adaptive = AdaptiveK.of(opts.speculate, opts.speculate_k) if opts.speculate and self.rows == 1 else None
            if adaptive is not None and is_draft(opts.speculate):
                draft = await self.client.draft(opts.speculate)  # type: ignore[arg-type]
                if self._draft is None or self._draft.draft is not draft:
                    self._draft = draft.state()
            if adaptive is not None and opts.speculate == "stage":
                self._check_stage_draft()
            self.phase = Phase.FEEDING
            try:
                while self.phase is not Phase.DONE:
                    try:
                        if self.phase is Phase.FEEDING:  # what the caches lack; the last chunk samples
                            seq = await self._feed(opts, len(out_ids), stop_ids, truncate)
                            truncate = None
                            run = await self._next_tokens(seq)
                            self.phase = Phase.STREAMING
                        for token, logprob, tops in run:  # STREAMING: each token as it is known
                            out_ids.append(token)
                            self.history.append(token)
                            at_limit = len(out_ids) >= opts.max_new_tokens or len(self.history) - 1 >= self.max_length  # type: ignore[operator]
                            text = stream.push(token, at_limit)
                            if logprob is not None:
                                scores.append(logprob)
                                alternatives.append(tops)
                            yield Piece(token, text, stream.finish_reason or "", logprob, tops)
                            if stream.finish_reason:
                                self.last = Generation(
                                    stream.text,
                                    out_ids,
                                    prompt_ids,
                                    stream.finish_reason,
                                    scores if opts.logprobs or opts.top_logprobs else None,
                                    alternatives if opts.top_logprobs else None,
                                )
                                self.phase = Phase.DONE
                                break
                        if self.phase is Phase.DONE:
                            break
                        drafts = 0
                        if not self._looping:  # feed the token back ourselves (no server loop, or it ended)
                            seq, drafts = await self._step_on(opts, len(out_ids), stop_ids, adaptive)
                        run = await self._next_tokens(seq)
                        if drafts:
                            self.fed += len(run) - 1  # the accepted proposals are in the caches
                            self.drafted += drafts
                            self.accepted += len(run) - 1
                            adaptive.update(drafts, len(run) - 1)  # type: ignore[union-attr]
                    except RPCError as e:
                        await move(e)
                        truncate = None
                        self.phase = Phase.FEEDING  # the whole conversation, to the new chain
            finally:
                if self._looping and self._halting is None and not self._closed:  # a stop string, or the caller left
                    self._halting = asyncio.ensure_future(self._halt())

    async def _step_on(
        self, opts: Options, drawn: int, stop_ids: Sequence[int], adaptive: AdaptiveK | None
    ) -> tuple[int, int]:
        """The client loop's next step: the last token, and with speculation the proposals after it, prompt
        lookup's or the draft model's (never more than the tokens still to generate, nor past max_length). Returns
        its seq and the proposals."""
        remaining = opts.max_new_tokens - drawn
        truncate = self.fed if self._spill else None  # the previous step's rejected proposals go first
        self._spill = False
        loop = self._loop(remaining, stop_ids, opts)
        drafts: list[int] = []
        if adaptive is not None and loop is None:
            k = min(adaptive.k, remaining - 1, self.max_length - self.fed - 2)  # type: ignore[operator]
            if k <= 0:
                pass
            elif is_draft(opts.speculate):  # the draft model's greedy continuation, computed off the event loop
                drafts = await asyncio.to_thread(self._draft.propose, self.history, k)
            elif opts.speculate == "stage":  # the first stage proposes in the server loop only
                pass
            else:
                drafts = ngram_propose(self.history, k)
        seq = await self._send(
            [self.history[-1], *drafts], self.fed, sample=True, truncate=truncate, loop=loop, drafts=len(drafts)
        )
        self._spill = self._spill or bool(drafts)
        self.fed += 1
        self._inflight, self._looping = seq, loop is not None
        return seq, len(drafts)

    def _check_stage_draft(self) -> None:
        """speculate="stage" needs the server loop and a first stage whose host runs a draft model."""
        if not self.client.config.server_loop:
            raise RPCError(INVALID, 'speculate="stage": the first stage proposes in the server loop (server_loop=True)')
        first = self.links[0]
        if not first.info.draft_model:
            raise RPCError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'speculate="stage": the first stage ({first.address}, layers {first.info.start_layer}:'
                f"{first.info.end_layer}) runs no draft model (start it with --draft PATH or --draft smollm2)",
            )

    def _loop(self, remaining: int, stop_ids: Sequence[int], opts: Options) -> stage_pb2.Loop | None:
        """The server loop for the rest of a generation (None: this client feeds the tokens back itself); with
        speculation (one-row sessions) the last stage proposes by prompt lookup itself. A draft model runs here,
        so with one this client feeds every round."""
        if not self.client.config.server_loop or (is_draft(opts.speculate) and self.rows == 1):
            return None
        loop = stage_pb2.Loop(
            address=self.links[0].address,
            session_id=self.ids[0],
            max_new_tokens=remaining,
            stop_token_ids=list(stop_ids),
        )
        if opts.speculate and self.rows == 1:
            loop.speculate, loop.speculate_k = opts.speculate, opts.speculate_k or 0
            self._spill = True  # its last round may leave rejected proposals in the caches
        return loop

    async def _feed(self, opts: Options, drawn: int, stop_ids: Sequence[int], truncate: int | None) -> int:
        """Send the tokens the stages do not hold yet in chunks of at most `_chunk`; the last chunk samples (the
        generation's draw number `drawn` on) and, with the server loop, starts it. Returns the last step's seq."""
        if self.fed == 0 and not truncate:
            attached = await self._attach_prefix(self.history)
            if attached is not None:  # some stage's rows hold a prefix now: every stage continues from `attached`
                truncate = self.fed = attached
        if self._spill and truncate is None:  # roll back what a speculative step left past `fed`
            truncate = self.fed
        self._spill = False  # the first chunk's truncate leaves the caches holding `fed` positions exactly
        pending = self.history[self.fed :]
        loop = self._loop(opts.max_new_tokens - drawn, stop_ids, opts)
        for c0 in range(0, len(pending), self._chunk):
            chunk = pending[c0 : c0 + self._chunk]
            last = c0 + self._chunk >= len(pending)
            seq = await self._send(
                chunk,
                self.fed,
                sample=last,
                opts=opts if last else None,
                truncate=truncate,
                loop=loop if last else None,
                draws=drawn,
            )
            truncate = None
            self.fed += len(chunk)
        self._inflight, self._looping = seq, loop is not None
        return seq

    async def _attach_prefix(self, tokens: list[int]) -> int | None:
        """Ask every stage of the chain to attach what it has cached of `tokens` to the (empty) session; returns
        the positions all of them hold (at most all but the last token, whose logits are needed), or None when no
        stage attached anything."""
        cfg = self.client.config
        sizes = [link.info.kv_block_size for link in self.links]
        if not cfg.reuse_prefixes or self.rows != 1 or not all(sizes) or len(tokens) <= max(sizes):
            return None

        async def one(link: Link, sid: str) -> int:
            req = stage_pb2.PrefixRequest(session_id=sid, client_key=self.client.client_key, tokens=tokens)
            try:
                return (await link.stub.AttachPrefix(req, timeout=cfg.connect_timeout)).positions
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # a stage of an older version: it holds nothing
                    return 0
                raise RPCError.from_grpc(e, link.address) from None

        held = await asyncio.gather(*(one(link, sid) for link, sid in zip(self.links, self.ids, strict=True)))
        if not any(held):
            return None
        return min(*held, len(tokens) - 1)

    async def _take(self, seq: int) -> stage_pb2.Result:
        """The next result of step (or loop) `seq`, with the bookkeeping of a loop's final result."""
        result = await self._wait(seq)
        if result.done:
            self._looping = False
            if result.lengths:
                self.fed = int(result.lengths[0])
        if not self._looping:
            self._inflight = None
        return result

    async def _next_tokens(self, seq: int) -> list[tuple[int, float | None, tuple]]:
        """The token the next result of `seq` carries, or (speculative decoding) its accepted run and one more,
        each with its log-probability and most likely alternatives when the generation asked for them."""
        result = await self._take(seq)
        if not result.token_ids:
            raise RPCError(
                grpc.StatusCode.INTERNAL, "the generation loop ended without a token", self.links[-1].address
            )
        if not result.drafted:
            n = 1
        elif len(result.token_ids) > result.drafted + 1:
            raise RPCError(
                grpc.StatusCode.INTERNAL,
                f"{len(result.token_ids)} tokens for a step of {result.drafted} proposals",
                self.links[-1].address,
            )
        else:
            n = len(result.token_ids)
        ids = [int(t) for t in result.token_ids[:n]]
        if not result.HasField("token_logprobs"):
            return [(t, None, ()) for t in ids]
        try:
            n_all = len(result.token_ids)
            lps = flat_values(result.token_logprobs, "token_logprobs", tensor_pb2.FLOAT32, [n_all])
            tops: list[tuple] = [()] * n_all
            if result.HasField("top_ids"):
                shape = list(result.top_ids.shape)
                top = shape[1] if len(shape) == 2 else 0
                top_ids = flat_values(result.top_ids, "top_ids", tensor_pb2.INT64, [n_all, top])
                top_lps = flat_values(result.top_logprobs, "top_logprobs", tensor_pb2.FLOAT32, [n_all, top])
                tops = [
                    tuple(zip(top_ids[i * top : (i + 1) * top], top_lps[i * top : (i + 1) * top], strict=True))
                    for i in range(n_all)
                ]
        except BadInputError as e:
            raise RPCError(
                grpc.StatusCode.DATA_LOSS, f"a result's log-probabilities: {e}", self.links[-1].address
            ) from None
        return [(t, lps[i], tops[i]) for i, t in enumerate(ids)]

    async def _halt(self) -> None:
        """Ask the last stage to end the session's generation loop (its final Result follows on the stream)."""
        link = self.links[-1]
        try:
            await link.stub.Halt(
                stage_pb2.HaltRequest(session_id=self.ids[-1], client_key=self.client.client_key),
                timeout=self.client.config.connect_timeout,
            )
        except grpc.aio.AioRpcError as e:
            raise RPCError.from_grpc(e, link.address) from None

    async def _settle(self) -> None:
        """Before a new generation: the previous one's last step has landed, and a server loop has ended (halted if
        need be), so that `fed` says exactly what the stages' caches hold."""
        if self._looping:
            halting, self._halting = self._halting or asyncio.ensure_future(self._halt()), None
            await halting
        while self._inflight is not None:
            await self._take(self._inflight)

    async def _send(
        self,
        tokens: list[int],
        start: int,
        sample: bool,
        opts: Options | None = None,
        truncate: int | None = None,
        loop: stage_pb2.Loop | None = None,
        draws: int = 0,
        drafts: int = 0,
    ) -> int:
        step = stage_pb2.Step(
            session_id=self.ids[0],
            positions=int64_rows([list(range(start, start + len(tokens)))]),
            tokens=int64_rows([tokens]),
            sample=sample,
            drafts=drafts,
        )
        if opts is not None:
            step.sampling.CopyFrom(opts.sampling(draws))
        if truncate is not None:
            step.truncate = truncate
        if loop is not None:
            step.loop.CopyFrom(loop)
        return await self._write(step)

    async def _write(self, step: stage_pb2.Step) -> int:
        """Push a step (its seq is set here) into the first stage; returns the seq."""
        if step.seq == 0:
            self._seq += 1
            step.seq = self._seq
        step.client_key = self.client.client_key
        try:
            await self._push.write(step)  # type: ignore[union-attr]
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            if isinstance(e, grpc.aio.AioRpcError):
                raise RPCError.from_grpc(e, self.links[0].address) from None
            raise RPCError(grpc.StatusCode.UNAVAILABLE, "the session's stream to the first stage is closed") from None
        return step.seq

    async def _wait(self, seq: int) -> stage_pb2.Result:
        timeout = self.client.config.step_timeout
        while True:
            # a timer that drops a marker in the queue: cheaper per token than asyncio.wait_for, which makes a task
            timer = asyncio.get_running_loop().call_later(timeout, self._events.put_nowait, ("timeout", seq))
            try:
                kind, msg = await self._events.get()
            finally:
                timer.cancel()
            if kind == "timeout":
                if msg != seq:
                    continue  # an earlier wait's marker
                raise RPCError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no result for step {seq} within {timeout:g} s")
            if kind == "broken":
                raise msg
            if kind == "reply":
                raise RPCError(code_from_int(msg.code), msg.message, msg.stage)
            if msg.code:  # the session's generation loop failed on its way round
                self._looping = False
                raise RPCError(code_from_int(msg.code), msg.message, msg.stage)
            if msg.seq == seq:
                return msg
            # an older step's result (a generation stopped early): skip it


async def _close_on(links: list[Link], ids: list[str], key: str, timeout: float) -> None:
    async def one(link: Link, sid: str) -> None:
        if sid:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                req = stage_pb2.CloseSessionRequest(session_id=sid, client_key=key)
                await link.stub.CloseSession(req, timeout=timeout)

    await asyncio.gather(*(one(link, sid) for link, sid in zip(links, ids, strict=True)))
