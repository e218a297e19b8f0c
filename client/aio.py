"""The asyncio client: open sessions on a route of stage servers and stream generated tokens.

Data path (the hidden state never comes back here): the session's Push stream carries the prompt into the first
stage, the stages pass hidden states along, and the last stage samples and publishes each token on the session's
Subscribe stream. The prompt's last step carries a `Loop`: the last stage then feeds every sampled token straight
back to the first stage itself (N network hops per token for N stages, this client off the critical path) until
a stop token, max_new_tokens or max_length; a stop string or a caller who stops reading ends it with Halt. With
`ClientConfig(server_loop=False)` this client feeds each token back instead (N + 1 hops). A session keeps the
conversation's tokens (`history`) and how many of them the stages' KV caches hold (`fed`; after a loop, the
count its final Result reports), so later calls continue from the cache. Every failure surfaces as `RPCError`.

Failover: when a session's stage dies, stalls past `step_timeout` or is cut off, the session asks every stage of
its chain for Info to find which failed, bans those for `ban_seconds`, gets another chain (from the coordinator,
which stands a replica in or re-plans; a fixed route can only be tried again as it is), opens the session there
and replays its tokens (the conversation so far, the tokens generated so far included) so the new stages' caches
hold what the old ones did; then it goes on sampling where it was (`SamplingParams.draws` continues a seeded
generation's random numbers; an unseeded sampling generation gets a random seed here so that it can). The caller's
stream only pauses. A micro-batch of `generate_batch` or `score`, whose results are not streamed, simply runs
again on the new chain. The client imports no torch, unless a generation asks for a draft model
(`speculate="smollm2"` or a path: `layerline.draft`), which it then loads once and runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Awaitable, Collection, Sequence
from typing import Any

import grpc

from layerline.client import batch
from layerline.client.errors import RPCError
from layerline.client.session import AsyncSession
from layerline.client.types import (
    INVALID,
    RETRIABLE,
    ClientConfig,
    Failover,
    Generation,
    Link,
    Options,
    Piece,
    Scores,
)
from layerline.grpc_setup import channel_options
from layerline.sampling_params import logprob_problems
from layerline.tokenizer import Tokenizer
from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc

__all__ = ["AsyncClient", "AsyncSession", "ClientConfig", "Failover", "Generation", "Options", "Piece", "Scores"]

logger = logging.getLogger(__name__)

TOKENIZER_MAX_BYTES = 256 << 20  # a tokenizer JSON larger than this from a stage is refused (not decompressed)


def _tokenizer_text(resp: stage_pb2.TokenizerResponse, address: str) -> str:
    """The JSON of a GetTokenizer answer: compressed (what stages send when asked) or plain (older stages)."""
    if not resp.tokenizer_json_zlib:
        return resp.tokenizer_json
    try:
        d = zlib.decompressobj()
        raw = d.decompress(resp.tokenizer_json_zlib, TOKENIZER_MAX_BYTES)
        if d.unconsumed_tail or not d.eof:
            raise ValueError(f"more than {TOKENIZER_MAX_BYTES} bytes, or cut short")
        return raw.decode("utf-8")
    except (zlib.error, ValueError) as e:
        raise RPCError(grpc.StatusCode.DATA_LOSS, f"{address} sent a tokenizer that does not decompress: {e}") from None


class AsyncClient:
    """`AsyncClient(route=["host:port", ...])`: the stages in pipeline order (first stage first); or
    `AsyncClient(coordinator="host:port")`: the coordinator names them (the fastest chain of ready stages)."""

    def __init__(
        self,
        route: Sequence[str] | str | None = None,
        *,
        coordinator: str = "",
        config: ClientConfig | None = None,
    ) -> None:
        if isinstance(route, str):
            route = route.split(",")
        self.route = [a.strip() for a in route or () if a.strip()]
        self.coordinator = coordinator.strip()
        if not self.route and not self.coordinator:
            raise RPCError(INVALID, "give a route (host:port,host:port,...) or a coordinator (host:port)")
        if self.route and self.coordinator:
            raise RPCError(INVALID, "give a route or a coordinator, not both")
        self.config = config or ClientConfig()
        self._links: list[Link] | None = None  # the chain new sessions open on
        self._channels: dict[str, Link] = {}  # every stage this client has talked to (channels are reused)
        self._banned: dict[str, float] = {}  # address -> until when (monotonic) it is left out of routes
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_loaded = False
        self._drafts: dict[str, Any] = {}  # speculate name -> its checked layerline.draft.DraftModel
        self._draft_lock = asyncio.Lock()
        self._lock = asyncio.Lock()
        if self.config.max_in_flight < 1:
            raise RPCError(INVALID, f"max_in_flight must be at least 1, got {self.config.max_in_flight}")
        self._slots: asyncio.Semaphore | None = None
        self._sessions: weakref.WeakSet[AsyncSession] = weakref.WeakSet()  # open ones: closed before the channels
        # this client's secret: the stages bind its sessions to it, and no other client can step, read or close them
        self.client_key = secrets.token_urlsafe(24)

    def in_flight(self) -> asyncio.Semaphore:
        """The client's bound on work in flight: a generation or a micro-batch holds one of `max_in_flight` slots
        while it runs; the rest wait their turn (first come, first served)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_in_flight)
        return self._slots

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> list[stage_pb2.StageInfo]:
        """Reach every stage and check that together they serve one model's layers in order."""
        async with self._lock:
            attempt = 0
            deadline = time.monotonic() + self.config.connect_timeout
            while self._links is None:
                if self.coordinator:
                    try:
                        self.route = await self._route_from_coordinator()
                    except RPCError as e:
                        # ABORTED: the stages are loading a new plan's layers; ask again until connect_timeout
                        if e.code != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
                        attempt += 1
                        continue
                try:
                    self._links = await self._chain(self.route)
                except RPCError as e:
                    stale = e.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE)
                    if not (self.coordinator and stale and attempt < self.config.route_retries):
                        raise
                    # the coordinator's soft state lags the stages by up to a heartbeat: ask it again
                    await asyncio.sleep(0.25 * 2**attempt)
                    attempt += 1
        return [link.info for link in self._links]

    def _link(self, address: str) -> Link:
        link = self._channels.get(address)
        if link is None:
            ch = self.config.security.channel(address, channel_options(self.config.max_message_bytes))
            link = self._channels[address] = Link(address, ch, stage_pb2_grpc.StageStub(ch))
        return link

    async def _chain(self, route: list[str]) -> list[Link]:
        """Links to the stages of `route`, each asked for Info now, checked to chain one model's layers in order."""
        links = [Link(a, self._link(a).channel, self._link(a).stub) for a in route]
        infos = await asyncio.gather(*(self._info(link) for link in links))
        _check_route(links, infos)
        for link, info in zip(links, infos, strict=True):
            link.info = info
        return links

    async def reroute(self, failed: Collection[str] = (), attempts: list[int] | None = None) -> list[Link]:
        """After a failure: leave the `failed` stages out for `ban_seconds` and find a working chain (the one new
        sessions then open on). With a coordinator, ask it for a chain without the banned stages, again and again
        (backing off) until `failover_timeout`: it stands a replica in at once, or re-plans once their heartbeats
        stop and the survivors have loaded the layers. A fixed route can only be checked and tried again."""
        now = time.monotonic()
        for address in failed:
            self._banned[address] = now + self.config.ban_seconds
        self._banned = {a: t for a, t in self._banned.items() if t > now}
        deadline = now + self.config.failover_timeout
        delay = 0.1
        while True:
            if attempts is not None:
                attempts.append(1)
            try:
                if self.coordinator:
                    route = await self._route_from_coordinator(exclude=sorted(self._banned))
                else:
                    banned = [a for a in self.route if a in self._banned]
                    if banned:
                        raise RPCError(
                            grpc.StatusCode.UNAVAILABLE,
                            f"stage {', '.join(banned)} failed, and with a fixed route (no coordinator) there is no "
                            "other stage to move its layers to",
                        )
                    route = self.route
                links = await self._chain(route)
            except RPCError as e:
                retry = e.code in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.ABORTED,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                if not retry or (not self.coordinator and "fixed route" in e.details):
                    raise
                if time.monotonic() + delay > deadline:
                    raise RPCError(
                        e.code, f"no working chain of stages within {self.config.failover_timeout:g} s: {e.details}"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            async with self._lock:
                self.route, self._links = list(route), links
            return links

    async def move(self, error: RPCError, links: list[Link], what: str, replay_tokens: int) -> list[Link]:
        """After `links` failed with `error`: find the stages that do not answer, leave them out, get a working
        chain (`reroute`) and tell `config.on_failover` (or the log) what happened and how long it took."""
        t0 = time.monotonic()
        failed = await self.locate_failure(links)
        attempts: list[int] = []
        chain = await self.reroute(failed, attempts)
        moved = Failover(what, str(error), tuple(failed), time.monotonic() - t0, len(attempts) > 1, replay_tokens)
        if self.config.on_failover is not None:
            logger.info("%s", moved.note())
            self.config.on_failover(moved)
        else:
            logger.warning("%s", moved.note())
        return chain

    async def locate_failure(self, links: list[Link]) -> list[str]:
        """The stages of a chain that do not answer Info within `probe_timeout` (dead, stalled or cut off)."""

        async def dead(link: Link) -> bool:
            try:
                await link.stub.Info(stage_pb2.InfoRequest(), timeout=self.config.probe_timeout)
                return False
            except grpc.aio.AioRpcError:
                return True

        found = await asyncio.gather(*(dead(link) for link in links))
        return [link.address for link, bad in zip(links, found, strict=True) if bad]

    def may_fail_over(self, error: BaseException, done: int) -> bool:
        return (
            isinstance(error, RPCError)
            and self.config.failover
            and error.code in RETRIABLE
            and done < self.config.max_failovers
        )

    async def _route_from_coordinator(self, exclude: Sequence[str] = ()) -> list[str]:
        async with self.config.security.channel(self.coordinator) as channel:
            try:
                route = await coordinator_pb2_grpc.CoordinatorStub(channel).GetRoute(
                    coordinator_pb2.RouteRequest(exclude=exclude), timeout=self.config.connect_timeout
                )
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise RPCError(
                        e.code(), f"the coordinator is unreachable: {e.details()}", self.coordinator
                    ) from None
                raise RPCError.from_grpc(e, self.coordinator) from None
        return list(route.addresses)

    async def _info(self, link: Link) -> stage_pb2.StageInfo:
        try:
            return await link.stub.Info(stage_pb2.InfoRequest(), timeout=self.config.connect_timeout)
        except grpc.aio.AioRpcError as e:
            raise RPCError(e.code(), f"stage {link.address} is not reachable: {e.details()}", link.address) from None

    def forget_route(self) -> None:
        """The chain new sessions open on is out of date: the next one asks the coordinator again."""
        self._links = None

    async def links(self) -> list[Link]:
        await self.connect()
        assert self._links is not None
        return self._links

    async def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer, fetched once from the first stage (None if the stages have none)."""
        if not self._tokenizer_loaded:
            link = (await self.links())[0]
            try:
                resp = await link.stub.GetTokenizer(
                    stage_pb2.TokenizerRequest(zlib=True), timeout=self.config.connect_timeout
                )
                self._tokenizer = Tokenizer.from_json(_tokenizer_text(resp, link.address))
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise RPCError.from_grpc(e, link.address) from None
            self._tokenizer_loaded = True
        return self._tokenizer

    async def draft(self, name: str) -> Any:
        """The draft model `name` (an embedded model's name or a path), loaded once, in a worker thread, and
        checked against the chain's tokenizer; a draft that cannot serve is an RPCError naming why."""
        async with self._draft_lock:
            if name not in self._drafts:
                from layerline.draft import DraftModel  # torch: only for a client that asks for a draft
                from layerline.errors import CheckpointError

                tokenizer = await self.tokenizer()
                vocab = (await self.links())[0].info.vocab_size
                try:
                    model = await asyncio.to_thread(DraftModel, name)
                    model.check(tokenizer, vocab)
                except CheckpointError as e:
                    raise RPCError(grpc.StatusCode.FAILED_PRECONDITION, f"speculate: {e}") from None
                self._drafts[name] = model
            return self._drafts[name]

    def session(self, max_length: int | None = None) -> AsyncSession:
        """`async with client.session(max_length=2048) as s:` — several generate/chat calls share one KV cache."""
        return AsyncSession(self, max_length)

    def generate(
        self, prompt: str | Sequence[int], *, stream: bool = True, **options: Any
    ) -> AsyncIterator[Piece] | Awaitable[Generation]:
        """Stream `Piece`s (async for) or, with stream=False, await one `Generation`. Options: max_new_tokens,
        temperature, top_k, top_p, repetition_penalty, seed, stop (strings), stop_token_ids. A session is opened
        for the call and closed at its end, or as soon as the caller stops iterating."""
        opts = Options.make(**options)
        return self._one_shot(prompt, None, opts) if stream else self._one_shot_result(prompt, None, opts)

    def chat(
        self, messages: list[dict[str, Any]], *, stream: bool = True, **options: Any
    ) -> AsyncIterator[Piece] | Awaitable[Generation]:
        """Like generate, with the prompt made by the model's chat template from `messages`."""
        opts = Options.make(**options)
        return self._one_shot(None, messages, opts) if stream else self._one_shot_result(None, messages, opts)

    async def generate_batch(
        self, prompts: Sequence[str | Sequence[int]], *, micro_batch_size: int | None = None, **options: Any
    ) -> list[Generation]:
        """One `Generation` per prompt (text or token ids), the same as generating for each alone. The prompts go
        through the pipeline in micro-batches of `micro_batch_size` rows (default `config.micro_batch_size`), all
        pushed back to back so that every stage works at once; returns when all are done. Options as generate;
        stop strings end a row's text on the client side (its row runs on to a stop token or max_new_tokens)."""
        opts = Options.make(**options).seeded()  # a micro-batch run again after a failover samples the same
        if opts.logprobs or opts.top_logprobs:
            raise RPCError(INVALID, "generate_batch reports no log-probabilities: use generate (or score_top)")
        ids = await self._batch_ids(prompts, "prompt")
        size = self.config.micro_batch_size if micro_batch_size is None else micro_batch_size
        return await batch.run_micro_batches(self, ids, size, lambda c, part: batch.generate_micro_batch(c, part, opts))

    async def score(
        self, sequences: Sequence[str | Sequence[int]], *, micro_batch_size: int | None = None
    ) -> list[list[float]]:
        """Per-token log-probabilities of each sequence (text or token ids): entry i of a sequence's list is
        log P(token i+1 | tokens 0..i), so a sequence of n tokens gets n - 1 values (their sum is its
        log-likelihood; exp(-mean) its perplexity). Micro-batches as in generate_batch."""
        return [s.logprobs for s in await self.score_top(sequences, 0, micro_batch_size=micro_batch_size)]

    async def score_top(
        self, sequences: Sequence[str | Sequence[int]], top_logprobs: int, *, micro_batch_size: int | None = None
    ) -> list[Scores]:
        """As `score`, and at each position the `top_logprobs` (0..20) most likely tokens with their
        log-probabilities, computed at the last stage from the same logits (OpenAI's `echo` with `logprobs`)."""
        problems = logprob_problems(top_logprobs)
        if problems:
            raise RPCError(INVALID, problems[0])
        ids = await self._batch_ids(sequences, "sequence")
        size = self.config.micro_batch_size if micro_batch_size is None else micro_batch_size
        return await batch.run_micro_batches(
            self, ids, size, lambda c, part: batch.score_micro_batch(c, part, top_logprobs)
        )

    async def _batch_ids(self, items: Sequence[str | Sequence[int]], what: str) -> list[list[int]]:
        """Token ids of a batch's texts or id lists, each non-empty and in the vocabulary."""
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise RPCError(INVALID, f"{what}s must be a list (of strings or of token id lists)")
        if not items:
            raise RPCError(INVALID, f"{what}s: the list is empty")
        ids = [await self._prompt_ids(x, None) for x in items]
        vocab = (await self.links())[0].info.vocab_size
        for i, x in enumerate(ids):
            if not x:
                raise RPCError(INVALID, f"every {what} needs at least one token ({what} {i} has none)")
            if any(not 0 <= t < vocab for t in x):
                raise RPCError(INVALID, f"{what} {i}: token ids must be in [0, {vocab})")
        return ids

    async def _one_shot(
        self, prompt: str | Sequence[int] | None, messages: list[dict[str, Any]] | None, opts: Options
    ) -> AsyncIterator[Piece]:
        ids = await self._prompt_ids(prompt, messages)
        async with self.in_flight(), self.session(max_length=await self.fit(len(ids) + opts.max_new_tokens)) as s:
            async with contextlib.aclosing(s._generate(ids, opts, slot=False)) as pieces:
                async for piece in pieces:
                    yield piece

    async def _one_shot_result(
        self, prompt: str | Sequence[int] | None, messages: list[dict[str, Any]] | None, opts: Options
    ) -> Generation:
        ids = await self._prompt_ids(prompt, messages)
        async with self.in_flight(), self.session(max_length=await self.fit(len(ids) + opts.max_new_tokens)) as s:
            return await s._gather(s._generate(ids, opts, slot=False))

    async def fit(self, length: int) -> int:
        """`length` positions, or the model's context where that is shorter."""
        return min([length] + [link.info.max_length for link in await self.links() if link.info.max_length])

    async def prompt_ids(
        self, prompt: str | Sequence[int] | None = None, messages: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The token ids generate / chat would feed for `prompt` (text or ids) or `messages` (the chat template)."""
        return await self._prompt_ids(prompt, messages)

    async def _prompt_ids(
        self, prompt: str | Sequence[int] | None, messages: list[dict[str, Any]] | None, first: bool = True
    ) -> list[int]:
        """Token ids of a text prompt (special tokens such as BOS only at the start of a conversation), of a chat,
        or of ids given as they are."""
        if messages is not None or isinstance(prompt, str):
            tok = await self.tokenizer()
            if tok is None:
                raise RPCError(grpc.StatusCode.FAILED_PRECONDITION, "the stages serve no tokenizer: pass token ids")
            try:
                if messages is not None:
                    return tok.encode_chat(messages)
                return tok.encode(prompt, add_special_tokens=first)  # type: ignore[arg-type]
            except ValueError as e:
                raise RPCError(INVALID, str(e)) from None
        try:
            ids = [int(i) for i in prompt]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise RPCError(INVALID, "the prompt must be a string or a sequence of token ids") from None
        return ids

    async def close(self) -> None:
        # sessions still open (a stream left with `break` is closed by its finalizer a moment later, maybe after
        # this): freed on the stages now, while the channels are still there
        for session in list(self._sessions):
            with contextlib.suppress(Exception):
                await session.close()
        for link in self._channels.values():
            await link.channel.close()
        self._channels.clear()
        self._links = None


def _check_route(links: list[Link], infos: list[stage_pb2.StageInfo]) -> None:
    expect = 0
    for link, info in zip(links, infos, strict=True):
        if info.model_fingerprint != infos[0].model_fingerprint:
            raise RPCError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stage {link.address} serves another model ({info.model_name}) than {links[0].address} "
                f"({infos[0].model_name})",
            )
        if info.start_layer != expect:
            raise RPCError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the route does not cover the layers in order: {link.address} serves {info.start_layer}:"
                f"{info.end_layer} where layer {expect} was expected next",
            )
        expect = info.end_layer
    if expect != infos[0].num_layers:
        raise RPCError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the route ends at layer {expect} of {infos[0].num_layers}: layers {expect}:{infos[0].num_layers} are missing",
        )
