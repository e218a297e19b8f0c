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
again on the new chain. The client imports no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from layerline.client.errors import RPCError, code_from_int
from layerline.grpc_setup import channel_options
from layerline.security import Security
from layerline.text_stream import TextStream
from layerline.tokenizer import Tokenizer
from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc, tensor_pb2

logger = logging.getLogger(__name__)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
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


@dataclass(frozen=True)
class ClientConfig:
    step_timeout: float = 120.0  # seconds a step may take to come back before the call fails
    connect_timeout: float = 15.0  # seconds for Info / OpenSession / CloseSession calls
    max_message_bytes: int = 64 * 1024 * 1024  # largest message sent or received
    prefill_chunk: int = 512  # prompt tokens per step (fewer when the hidden states would not fit a message)
    wire_dtype: str = ""  # "float32", "float16" or "bfloat16" for hidden states between stages; "" = stage default
    server_loop: bool = True  # the last stage feeds sampled tokens back to the first (N hops per token); False: the
    # client feeds each token back itself (N + 1 hops; kept for comparison and for stages without loops)
    max_in_flight: int = 32  # generations and micro-batches this client runs at once; more wait their turn
    micro_batch_size: int = 4  # default rows per micro-batch of generate_batch and score
    route_retries: int = 4  # with a coordinator: ask again when its route is out of date (a stage just died, or is
    # switching layers and its heartbeat has not said so yet), waiting 0.25, 0.5, 1, 2 s between tries
    failover: bool = True  # a generation whose stage dies, stalls or is cut off moves to another chain and goes on
    max_failovers: int = 3  # moves per generation (or micro-batch) before its error reaches the caller
    failover_timeout: float = 60.0  # seconds to find a working chain after a failure (the coordinator may re-plan)
    ban_seconds: float = 30.0  # a stage found dead or stalled is left out of routes this long
    probe_timeout: float = 3.0  # seconds a stage gets to answer Info when a failure is being located
    security: Security = field(default_factory=Security)  # TLS / mutual TLS / token (`Security.from_files`)
    # told of each move to another chain (the CLI prints `Failover.note()` on stderr); None: logged as a warning
    on_failover: Callable[[Failover], None] | None = None


@dataclass(frozen=True)
class Failover:
    """A generation (or micro-batch) moved to another chain after its chain failed."""

    what: str  # "session 1a2b3c4d", "a micro-batch of 4 rows"
    error: str  # what failed, as the client saw it
    failed: tuple[str, ...]  # the stages that did not answer when asked
    seconds: float  # from the failure to a working chain: the pause the reader sees
    waited_for_plan: bool  # no chain without the failed stages at first: the coordinator re-planned meanwhile
    replay_tokens: int  # tokens the new chain computes again before the answer goes on

    def note(self) -> str:
        who = f"stage {', '.join(self.failed)} stopped answering" if self.failed else f"the chain failed ({self.error})"
        why = (
            "the coordinator gave the lost layers to the remaining stages, which loaded them"
            if self.waited_for_plan
            else "another chain was ready"
        )
        return (
            f"layerline: {who}; {self.what} moved to another chain in {self.seconds:.1f} s ({why}) and computed its "
            f"{self.replay_tokens} tokens again there; the answer goes on"
        )


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it adds (may be "" while a character or a stop string is incomplete)."""

    token_id: int
    text: str
    finish_reason: str = ""  # on a generation's last piece: "stop" or "length" (as Generation.finish_reason)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string), "length" (max_new_tokens or the session's max_length)


@dataclass(frozen=True)
class Options:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None = the tokenizer's end-of-sequence ids

    @classmethod
    def make(cls, **kw: Any) -> Options:
        if "stop" in kw and isinstance(kw["stop"], str):
            kw["stop"] = (kw["stop"],)
        for k in ("stop", "stop_token_ids"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        unknown = set(kw) - set(cls.__dataclass_fields__)
        if unknown:
            raise RPCError(INVALID, f"unknown generation option(s): {', '.join(sorted(unknown))}")
        o = cls(**kw)
        problems = []
        if o.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be positive, got {o.max_new_tokens}")
        if not o.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {o.temperature}")
        if o.top_k < 0:
            problems.append(f"top_k must be >= 0, got {o.top_k}")
        if not 0 < o.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {o.top_p}")
        if not o.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0, got {o.repetition_penalty}")
        if problems:
            raise RPCError(INVALID, "; ".join(problems))
        return o

    def sampling(self, draws: int = 0) -> stage_pb2.SamplingParams:
        msg = stage_pb2.SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            draws=draws,
        )
        if self.seed is not None:
            msg.seed = self.seed % (1 << 64)
        return msg

    def seeded(self) -> Options:
        """These options with a seed: a sampling generation without one gets a random seed here, so that a replay
        after a failover continues its random numbers (greedy needs none)."""
        if self.seed is not None or self.temperature == 0:
            return self
        return replace(self, seed=secrets.randbits(63))


RETRIABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # a stage died, was cut off or is shutting down
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a stage stalled (no result within step_timeout)
        grpc.StatusCode.ABORTED,
    }
)  # not NOT_FOUND: a session a stage expired (TTL) or dropped stays gone, as the stage said; not CANCELLED: that
# is this side closing its own streams (the caller left, or was interrupted)


def int64_matrix(rows: list[list[int]]) -> tensor_pb2.Tensor:
    """Equal-length rows of ints as a [B, T] int64 wire tensor."""
    flat = [v for r in rows for v in r]
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.INT64, shape=[len(rows), len(rows[0])], data=struct.pack(f"<{len(flat)}q", *flat)
    )


@dataclass
class _Link:
    address: str
    channel: grpc.aio.Channel
    stub: stage_pb2_grpc.StageStub
    info: stage_pb2.StageInfo = field(default_factory=stage_pb2.StageInfo)


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
        self._links: list[_Link] | None = None  # the chain new sessions open on
        self._channels: dict[str, _Link] = {}  # every stage this client has talked to (channels are reused)
        self._banned: dict[str, float] = {}  # address -> until when (monotonic) it is left out of routes
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_loaded = False
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

    def _link(self, address: str) -> _Link:
        link = self._channels.get(address)
        if link is None:
            ch = self.config.security.channel(address, channel_options(self.config.max_message_bytes))
            link = self._channels[address] = _Link(address, ch, stage_pb2_grpc.StageStub(ch))
        return link

    async def _chain(self, route: list[str]) -> list[_Link]:
        """Links to the stages of `route`, each asked for Info now, checked to chain one model's layers in order."""
        links = [_Link(a, self._link(a).channel, self._link(a).stub) for a in route]
        infos = await asyncio.gather(*(self._info(link) for link in links))
        _check_route(links, infos)
        for link, info in zip(links, infos, strict=True):
            link.info = info
        return links

    async def reroute(self, failed: Collection[str] = (), attempts: list[int] | None = None) -> list[_Link]:
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

    async def move(self, error: RPCError, links: list[_Link], what: str, replay_tokens: int) -> list[_Link]:
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

    async def locate_failure(self, links: list[_Link]) -> list[str]:
        """The stages of a chain that do not answer Info within `probe_timeout` (dead, stalled or cut off)."""

        async def dead(link: _Link) -> bool:
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

    async def _info(self, link: _Link) -> stage_pb2.StageInfo:
        try:
            return await link.stub.Info(stage_pb2.InfoRequest(), timeout=self.config.connect_timeout)
        except grpc.aio.AioRpcError as e:
            raise RPCError(e.code(), f"stage {link.address} is not reachable: {e.details()}", link.address) from None

    def forget_route(self) -> None:
        """The chain new sessions open on is out of date: the next one asks the coordinator again."""
        self._links = None

    async def links(self) -> list[_Link]:
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
        from layerline.client import batch

        opts = Options.make(**options).seeded()  # a micro-batch run again after a failover samples the same
        ids = await self._batch_ids(prompts, "prompt")
        size = self.config.micro_batch_size if micro_batch_size is None else micro_batch_size
        return await batch.run_micro_batches(self, ids, size, lambda c, part: batch.generate_micro_batch(c, part, opts))

    async def score(
        self, sequences: Sequence[str | Sequence[int]], *, micro_batch_size: int | None = None
    ) -> list[list[float]]:
        """Per-token log-probabilities of each sequence (text or token ids): entry i of a sequence's list is
        log P(token i+1 | tokens 0..i), so a sequence of n tokens gets n - 1 values (their sum is its
        log-likelihood; exp(-mean) its perplexity). Micro-batches as in generate_batch."""
        from layerline.client import batch

        ids = await self._batch_ids(sequences, "sequence")
        size = self.config.micro_batch_size if micro_batch_size is None else micro_batch_size
        return await batch.run_micro_batches(self, ids, size, batch.score_micro_batch)

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


def _check_route(links: list[_Link], infos: list[stage_pb2.StageInfo]) -> None:
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


class AsyncSession:
    """A conversation held in the stages' KV caches. Use `async with`; `generate` and `chat` continue it."""

    def __init__(self, client: AsyncClient, max_length: int | None, rows: int = 1) -> None:
        self.client = client
        self.max_length = max_length
        self.rows = rows  # sequences in the session: 1 for a conversation, a micro-batch's size in generate_batch
        self.ids: list[str] = []
        self.links: list[_Link] = []  # the chain the session is open on
        self.failovers = 0  # times the session moved to another chain
        self.history: list[int] = []  # every token of the conversation, prompts and generated
        self.fed = 0  # how many of them the stages' caches hold
        self.last: Generation | None = None
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

    async def _open_on(self, links: list[_Link]) -> None:
        limit = min(link.info.max_length or 1 << 30 for link in links)
        self.max_length = self.max_length or min(limit, 4096)
        cfg = self.client.config
        t = tensor_pb2
        wire = {"": 0, "float32": t.FLOAT32, "float16": t.FLOAT16, "bfloat16": t.BFLOAT16}.get(cfg.wire_dtype)
        if wire is None:
            raise RPCError(INVALID, f"wire_dtype {cfg.wire_dtype!r} is not float32, float16 or bfloat16")
        # prompt chunks small enough that the hidden states of one chunk fit every stage's message limit
        limit = min(
            [cfg.max_message_bytes] + [link.info.max_message_bytes for link in links if link.info.max_message_bytes]
        )
        itemsize = 2 if wire in (t.FLOAT16, t.BFLOAT16) else 4  # stage defaults: assume float32
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

    async def _pump(self, call: Any, kind: str, address: str) -> None:
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
        self.fed = 0
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
            try:
                await self._settle()
            except RPCError as e:  # the previous generation's stages are gone: start this one elsewhere
                if self._closed or not self.client.may_fail_over(e, moved):
                    raise
                moved += 1
                await self._fail_over(e)
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
            try:
                while True:
                    try:
                        seq = await self._feed(opts, len(out_ids), stop_ids, truncate)
                        truncate = None
                        token = await self._next_token(seq)
                        while True:
                            out_ids.append(token)
                            self.history.append(token)
                            at_limit = len(out_ids) >= opts.max_new_tokens or len(self.history) - 1 >= self.max_length  # type: ignore[operator]
                            text = stream.push(token, at_limit)
                            yield Piece(token, text, stream.finish_reason or "")
                            if stream.finish_reason:
                                self.last = Generation(stream.text, out_ids, prompt_ids, stream.finish_reason)
                                return
                            if not self._looping:  # feed the token back ourselves (no server loop, or it ended)
                                loop = self._loop(opts.max_new_tokens - len(out_ids), stop_ids)
                                seq = await self._send([token], self.fed, sample=True, loop=loop)
                                self.fed += 1
                                self._inflight, self._looping = seq, loop is not None
                            token = await self._next_token(seq)
                    except RPCError as e:
                        if self._closed or not self.client.may_fail_over(e, moved):
                            raise
                        moved += 1
                        await self._fail_over(e)  # then the loop above feeds the whole conversation to the new chain
                        truncate = None
            finally:
                if self._looping and self._halting is None and not self._closed:  # a stop string, or the caller left
                    self._halting = asyncio.ensure_future(self._halt())

    def _loop(self, remaining: int, stop_ids: Sequence[int]) -> stage_pb2.Loop | None:
        """The server loop for the rest of a generation (None: this client feeds the tokens back itself)."""
        if not self.client.config.server_loop:
            return None
        return stage_pb2.Loop(
            address=self.links[0].address,
            session_id=self.ids[0],
            max_new_tokens=remaining,
            stop_token_ids=list(stop_ids),
        )

    async def _feed(self, opts: Options, drawn: int, stop_ids: Sequence[int], truncate: int | None) -> int:
        """Send the tokens the stages do not hold yet in chunks of at most `_chunk`; the last chunk samples (the
        generation's draw number `drawn` on) and, with the server loop, starts it. Returns the last step's seq."""
        pending = self.history[self.fed :]
        loop = self._loop(opts.max_new_tokens - drawn, stop_ids)
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

    async def _next_token(self, seq: int) -> int:
        result = await self._take(seq)
        if not result.token_ids:
            raise RPCError(
                grpc.StatusCode.INTERNAL, "the generation loop ended without a token", self.links[-1].address
            )
        return int(result.token_ids[0])

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
    ) -> int:
        step = stage_pb2.Step(
            session_id=self.ids[0],
            positions=int64_matrix([list(range(start, start + len(tokens)))]),
            tokens=int64_matrix([tokens]),
            sample=sample,
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


async def _close_on(links: list[_Link], ids: list[str], key: str, timeout: float) -> None:
    async def one(link: _Link, sid: str) -> None:
        if sid:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                req = stage_pb2.CloseSessionRequest(session_id=sid, client_key=key)
                await link.stub.CloseSession(req, timeout=timeout)

    await asyncio.gather(*(one(link, sid) for link, sid in zip(links, ids, strict=True)))
