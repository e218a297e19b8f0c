"""The Stage gRPC servicer, on the event loop: the RPC handlers (sessions opened and closed, steps in on Push,
results out on Subscribe, Info, Halt, Drain) and the stage's lifecycle. What happens to a step is in four modules
of its own: admission.py (checked on arrival), scheduler.py (inline or queued, batched, on which thread),
compute.py (the layers, sampling, the generation loop's next step; compute thread) and relay.py (handed on, or its
failure handed back; the step metrics).

Data path (see protos/layerline/v1/stage.proto): a step arrives on a Push stream, is checked on the event loop
(session, shapes, dtypes: cheap, and a bad step is answered at once without disturbing anyone), then queued for
the single compute thread, which runs the stage's layers on the session's KV cache. The output goes to the next
stage over a shared long-lived stream (`downstream.py`) or, at the last stage, becomes a sampled token published
to the session's subscriber. While the compute thread works on one step the event loop keeps receiving the next
ones and sending the previous results, so network and compute overlap. Every failure becomes a PushReply with a
gRPC status code for the sender of the step; failures further down the chain are relayed back the same way.

Generation loop (the `Loop` of a step, at the last stage): after sampling, the last stage publishes the token and
sends it straight back to the first stage as the session's next step (`Step.looped`), so a token costs N network
hops and no client round trip; a one-stage route submits the step to itself without any hop. The
loop's state lives in `Session.loop`; it ends at a stop token, max_new_tokens, the session's max_length, or a
Halt, and its last Result says `done` and how many positions the caches hold. A loop step that fails further on
ends the loop with a Result carrying the status, so the client hears of it on the Subscribe stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

import layerline
from layerline import wire
from layerline.config import ModelConfig
from layerline.errors import (
    LayerlineError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from layerline.grpc_status import status_of
from layerline.metrics import Snapshot, uptime
from layerline.model import StageModel
from layerline.rate_limit import RateLimiter, parse_rate
from layerline.sampling import SamplingParams
from layerline.stage_server.admission import WorkItem, admit
from layerline.stage_server.capacity import device_memory, resident_bytes
from layerline.stage_server.compute import StepCompute
from layerline.stage_server.config import StageConfig
from layerline.stage_server.drafting import StageDraft, forget
from layerline.stage_server.kv import StageKV
from layerline.stage_server.pace import Pace
from layerline.stage_server.relay import SHUTDOWN, Relay, closed_error, put_latest
from layerline.stage_server.scheduler import Scheduler
from layerline.stage_server.sessions import Sampler, Session, SessionTable
from layerline.v1 import stage_pb2, stage_pb2_grpc

logger = logging.getLogger(__name__)

MAX_ROWS = 4096
CLIENT_KEY_CHARS = (16, 256)  # the length a client key must have
DEFAULT_DRAIN_WAIT = 30.0
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)  # seconds (metrics)
MAX_DRAIN_WAIT = 3600.0


class StageService(stage_pb2_grpc.StageServicer):
    def __init__(
        self,
        model: StageModel | None,
        config: StageConfig,
        model_name: str,
        fingerprint: str,
        tokenizer: Callable[[], bytes | None] | bytes | None,
        model_config: ModelConfig | None = None,
        drafter: StageDraft | None = None,
    ) -> None:
        # the layers new sessions get; a session keeps the model it was opened with (Session.model), so a stage
        # given another range by its coordinator serves its running sessions to their end on the old one
        self.model: StageModel | None = model
        self.model_config = model.config if model is not None else model_config
        self.stored_types: dict[str, str] | None = None  # the checkpoint's own tensor types (None: float)
        if self.model_config is None:
            raise ValueError("a stage without layers needs the model's config")
        self.config = config
        self.model_name, self.fingerprint = model_name, fingerprint
        # the tokenizer JSON served (zlib-compressed), or what builds it on the first request (server._tokenizer_loader)
        self._tokenizer: Callable[[], bytes | None] | bytes | None = tokenizer
        self._tokenizer_lock = asyncio.Lock()
        self.sessions = SessionTable(
            config.kv_cache_bytes,
            config.session_ttl,
            config.max_sessions,
            max_per_owner=config.max_sessions_per_client,
        )
        self.kv = StageKV(config, self.sessions)
        self.open_limit = RateLimiter(parse_rate(config.rate_limit)) if config.rate_limit else None
        self.stopping = False  # shutting down: new steps, and subscribers of sessions already gone, hear UNAVAILABLE
        self.draining = False  # Drain: no new sessions; the running ones end or move, then the stage shuts down
        self.drained = asyncio.Event()  # set when a drain is over: the server then stops (server.py)
        self.on_drain = None  # async callable run when a drain begins (leave the coordinator), set by server.py
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started = time.monotonic()
        self.metrics = CollectorRegistry()  # Prometheus (server.py serves it with --metrics-port)
        self.metrics.register(Snapshot(self._metrics))
        self.pass_seconds = Histogram(
            "layerline_stage_pass_seconds",
            "compute time of one forward pass (one step, or several sessions' steps batched)",
            registry=self.metrics,
            buckets=STEP_BUCKETS,
        )
        self.step_latency = Histogram(
            "layerline_stage_step_seconds",
            "a step's time at this stage: from its arrival to its result handed on (queue, compute, sampling)",
            registry=self.metrics,
            buckets=STEP_BUCKETS,
        )
        self.step_errors = Counter(
            "layerline_stage_step_errors",
            "steps refused or failed, by gRPC status code",
            ["code"],
            registry=self.metrics,
        )
        # the four jobs besides the RPCs, each in its own module: admission.py (event loop), compute.py (compute
        # thread), scheduler.py (between the two), relay.py (event loop)
        self.compute = StepCompute(drafter)
        self.pace = Pace()  # first stage: server-loop rounds and prompts, for the coordinator's measured figures
        self.scheduler = Scheduler(
            config, self.compute, lambda *a: self.relay.dispatch(*a), lambda: self.model, self.pass_seconds
        )
        self.relay = Relay(
            config,
            self.sessions,
            self.scheduler,
            self._admit,
            self._close,
            lambda: self.label,
            self.step_latency,
            self.step_errors,
        )

    @property
    def label(self) -> str:
        return _label(self.model)

    @property
    def serving(self) -> tuple[int, int]:
        return (self.model.start, self.model.end) if self.model is not None else (0, 0)

    def swap_model(self, model: StageModel) -> StageModel | None:
        """New sessions get `model` from now on; sessions already open finish on the one they have."""
        if model.config != self.model_config:
            raise ValueError("the new layers belong to another model")
        old, self.model = self.model, model
        logger.info("now serving %s (was %s)", _label(model), _label(old))
        return old

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.scheduler.start()
        self._tasks = [asyncio.create_task(self._sweep_loop(), name="session sweeper")]

    async def stop(self) -> None:
        """After the gRPC server has stopped: let the admitted steps finish (within the grace period), then
        release everything and join the compute thread."""
        self.stopping = True
        deadline = self._loop.time() + self.config.grace
        while self.scheduler.in_flight and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.relay.close_links()
        for s in self.sessions.all():
            self._close(s.id, SHUTDOWN)
        await self.scheduler.close()

    # ---- unary RPCs ----------------------------------------------------------------------------------------------

    async def Info(self, request: stage_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> stage_pb2.StageInfo:
        m, c, mc = self.model, self.config, self.model_config
        start, end = self.serving
        memory = device_memory(c.device)
        if m is not None and self.kv.paged:
            self.kv.pool(m)  # the figures of the pool new sessions get, made now if none was opened yet
        blocks, used, cached, hits = self.kv.blocks()
        return stage_pb2.StageInfo(
            model_name=self.model_name,
            model_fingerprint=self.fingerprint,
            start_layer=start,
            end_layer=end,
            num_layers=mc.num_layers,
            hidden_size=mc.hidden_size,
            vocab_size=mc.vocab_size,
            dtype=str(c.dtype).removeprefix("torch."),
            device=str(c.device),
            wire_dtype=wire.TO_WIRE[c.wire_dtype],
            next_address=c.next_address,
            kv_bytes_total=self.sessions.budget_bytes,
            kv_bytes_used=self.kv.used_bytes,
            open_sessions=len(self.sessions),
            max_message_bytes=c.max_message_bytes,
            kv_bytes_per_token=m.cache_bytes(1, 1) if m is not None else 0,
            version=layerline.__version__,
            max_length=mc.max_position_embeddings,
            compute_seconds=self.scheduler.compute_seconds,
            steps_computed=self.scheduler.steps_computed,
            tokens_computed=self.scheduler.tokens_computed,
            tokens_sampled=self.compute.tokens_sampled,
            tokens_drafted=self.compute.tokens_drafted,
            tokens_accepted=self.compute.tokens_accepted,
            draft_model=self.compute.drafter.name if self.compute.drafter is not None else "",
            tokens_proposed=self.compute.drafter.tokens_proposed if self.compute.drafter is not None else 0,
            inline_steps=self.scheduler.inline_steps,
            weight_bytes=m.weight_bytes() if m is not None else 0,
            weights=m.weight_summary() if m is not None else "",
            resident_bytes=resident_bytes(),
            device_name=memory.name,
            device_memory_used=memory.used,
            device_memory_total=memory.total,
            batched_steps=self.scheduler.batched_steps,
            queued_steps=self.scheduler.in_flight,
            peak_queued_steps=self.scheduler.peak_in_flight,
            max_queued_steps=c.max_queued_steps,
            peak_queued_results=self.relay.peak_results,
            max_loop_ahead=c.loop_ahead,
            kv_block_size=c.kv_block_size,
            kv_blocks_total=blocks,
            kv_blocks_used=used,
            kv_blocks_cached=cached,
            prefix_hit_tokens=hits,
            prefixes_shared=c.share_prefixes,
        )

    async def OpenSession(
        self, request: stage_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.OpenSessionResponse:
        m = self.model
        if m is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this stage has no layers yet (waiting for its coordinator's assignment)"
            )
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.label} is draining (leaving the cluster): open the session elsewhere",
            )
        if request.end_layer and (request.start_layer, request.end_layer) != (m.start, m.end):
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"the route is out of date: this stage serves layers {m.start}:{m.end} now, not "
                f"{request.start_layer}:{request.end_layer} (ask the coordinator for a new route)",
            )
        rows = request.rows or 1
        limit = m.config.max_position_embeddings
        lo, hi = CLIENT_KEY_CHARS
        if not lo <= len(request.client_key) <= hi:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"client_key must be a secret of {lo} to {hi} characters (got {len(request.client_key)}): the "
                "session is bound to it, and its calls and steps must carry it",
            )
        if self.open_limit is not None:
            wait = self.open_limit.acquire(request.client_key)
            if wait > 0:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.open_limit.message('OpenSession calls per client key')} on {self.label}; retry in "
                    f"{wait:.2f} s",
                )
        if not 0 < rows <= MAX_ROWS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rows must be in 1..{MAX_ROWS}, got {rows}")
        if request.max_length <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"max_length must be positive, got {request.max_length}"
            )
        if request.max_length > limit:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"max_length {request.max_length} exceeds the model's context of {limit}"
            )
        if rows * request.max_length > self.config.max_session_tokens:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a session of {rows} rows x max_length {request.max_length} = {rows * request.max_length} positions "
                f"is more than the {self.config.max_session_tokens} one session may hold here (--max-session-tokens)",
            )
        next_address, next_id = "", ""
        if not m.is_last:
            next_address = request.next_address or self.config.next_address
            next_id = request.next_session_id
            if not next_address:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{self.label} is not the last stage and has no next stage: give next_address or start it with --next",
                )
            if not next_id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "next_session_id is required (this is not the last stage)"
                )
        wire_dtype = self.config.wire_dtype
        if request.wire_dtype:
            wire_dtype = wire.FROM_WIRE.get(request.wire_dtype)
            if wire_dtype not in wire.WIRE_DTYPES.values():
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"wire_dtype {request.wire_dtype} is not float32, float16, bfloat16 or int8 rows",
                )
        try:
            kv_bytes = self.kv.reserve(m, rows, request.max_length)
            session = self.sessions.open(
                rows,
                request.max_length,
                kv_bytes,
                lambda: self.kv.new_cache(m, rows, request.max_length, request.client_key),
                next_address=next_address,
                next_session_id=next_id,
                wire_dtype=wire_dtype,
                model=m,
                owner=request.client_key,
            )
        except ResourceExhaustedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except RuntimeError as e:  # the allocation itself failed
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"could not allocate the KV cache: {e}")
        if m.is_last:
            session.sampler = Sampler(SamplingParams(), 0, [[] for _ in range(rows)])
            session.results = asyncio.Queue(maxsize=self.config.max_queued_results + 1)
        logger.info(
            "opened session %s (rows=%d, max_length=%d, %d bytes reserved)",
            session.id[:8],
            rows,
            request.max_length,
            kv_bytes,
            extra={"session": session.id[:8], "stage": self.label, "peer": context.peer()},
        )
        return stage_pb2.OpenSessionResponse(
            session_id=session.id, kv_bytes=kv_bytes, ttl_seconds=self.config.session_ttl
        )

    async def AttachPrefix(
        self, request: stage_pb2.PrefixRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.PrefixResponse:
        try:
            session = self._session(request.session_id, request.client_key)
        except LayerlineError as e:
            await context.abort(*status_of(e))
        rows = list(request.rows) or list(range(session.rows))
        bad = [r for r in rows if not 0 <= r < session.rows]
        if bad or len(set(rows)) != len(rows):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"rows must be distinct rows of the session's {session.rows}, got {rows}",
            )
        if len(request.tokens) > session.max_length:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{len(request.tokens)} tokens are more than the session's max_length of {session.max_length}",
            )
        vocab = session.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.tokens):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token ids must be in [0, {vocab})")
        try:
            held = self.kv.attach_prefix(session, rows, list(request.tokens))
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return stage_pb2.PrefixResponse(positions=held)

    async def CloseSession(
        self, request: stage_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.CloseSessionResponse:
        try:
            self.sessions.get(request.session_id, request.client_key)  # another client's: PERMISSION_DENIED
        except NotFoundError:
            return stage_pb2.CloseSessionResponse(closed=False)
        except PermissionDeniedError as e:
            await context.abort(*status_of(e))
        return stage_pb2.CloseSessionResponse(closed=self._close(request.session_id, "closed by the client"))

    async def GetTokenizer(
        self, request: stage_pb2.TokenizerRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.TokenizerResponse:
        async with self._tokenizer_lock:
            if callable(self._tokenizer):
                self._tokenizer = await asyncio.to_thread(self._tokenizer)
        if self._tokenizer is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{self.model_name} has no tokenizer on this stage"
            )
        if request.zlib:
            return stage_pb2.TokenizerResponse(tokenizer_json_zlib=self._tokenizer)
        return stage_pb2.TokenizerResponse(tokenizer_json=zlib.decompress(self._tokenizer).decode("utf-8"))

    async def Halt(self, request: stage_pb2.HaltRequest, context: grpc.aio.ServicerContext) -> stage_pb2.HaltResponse:
        session = await self._last_stage_session(request.session_id, request.client_key, context)
        loop = session.loop
        if loop is not None:
            loop.halted = True
        return stage_pb2.HaltResponse(running=loop is not None)

    async def Drain(
        self, request: stage_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.DrainResponse:
        wait = request.wait_seconds or DEFAULT_DRAIN_WAIT
        if not 0 < wait <= MAX_DRAIN_WAIT:  # NaN fails this too
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"wait_seconds must be in (0, {MAX_DRAIN_WAIT:g}], got {wait}"
            )
        open_now = len(self.sessions)
        if not self.draining and not self.stopping:
            self.draining = True
            self._tasks.append(asyncio.create_task(self._drain(wait), name="drain"))
        return stage_pb2.DrainResponse(open_sessions=open_now, stage=self.label)

    async def _drain(self, wait: float) -> None:
        """Leave the coordinator, give the open sessions up to `wait` seconds to end, then say the drain is over
        (the server shuts down: the sessions still open hear UNAVAILABLE and their clients move them)."""
        logger.warning(
            "draining %s: %d sessions open, waiting up to %g s for them", self.label, len(self.sessions), wait
        )
        if self.on_drain is not None:
            try:
                await self.on_drain()
            except Exception:
                logger.exception("leaving the coordinator failed")
        deadline = self._loop.time() + wait
        while len(self.sessions) and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        if len(self.sessions):
            logger.warning("drain: %d sessions still open after %g s: they move elsewhere", len(self.sessions), wait)
        self.drained.set()

    def _session(self, session_id: str, key: str) -> Session:
        """The open session with this id; NOT_FOUND if there is none, UNAVAILABLE if it went with a shutdown (the
        client may go elsewhere), PERMISSION_DENIED if `key` is not its client's."""
        try:
            return self.sessions.get(session_id, key)
        except NotFoundError:
            if self.stopping:
                raise UnavailableError(f"session closed: {SHUTDOWN}") from None
            raise

    def _metrics(self):
        """What Prometheus reads at each scrape (see layerline/metrics.py)."""
        start, end = self.serving
        yield uptime(self.started)
        yield ("layerline_stage_steps", "steps computed", "counter", self.scheduler.steps_computed, {})
        yield (
            "layerline_stage_batched_steps",
            "steps computed in a pass with other sessions' steps",
            "counter",
            self.scheduler.batched_steps,
            {},
        )
        yield (
            "layerline_stage_tokens",
            "token positions computed, and tokens sampled (last stage)",
            "counter",
            self.scheduler.tokens_computed,
            {"kind": "computed"},
        )
        yield ("layerline_stage_tokens", "", "counter", self.compute.tokens_sampled, {"kind": "sampled"})
        yield ("layerline_stage_tokens", "", "counter", self.compute.tokens_drafted, {"kind": "drafted"})
        yield ("layerline_stage_tokens", "", "counter", self.compute.tokens_accepted, {"kind": "accepted"})
        yield (
            "layerline_stage_inline_steps",
            "of the steps, those computed on the event loop (small, with the stage idle)",
            "counter",
            self.scheduler.inline_steps,
            {},
        )
        yield (
            "layerline_stage_compute_seconds",
            "compute thread time on steps",
            "counter",
            self.scheduler.compute_seconds,
            {},
        )
        yield (
            "layerline_stage_queue_depth",
            "steps admitted and not yet passed on",
            "gauge",
            self.scheduler.in_flight,
            {},
        )
        yield ("layerline_stage_open_sessions", "open sessions", "gauge", len(self.sessions), {})
        yield (
            "layerline_stage_kv_bytes_used",
            "KV cache bytes held by sessions",
            "gauge",
            self.kv.used_bytes,
            {},
        )
        if self.model is not None and self.kv.paged:
            self.kv.pool(self.model)  # the figures of the pool new sessions get, made now if none was opened yet
        blocks, used, cached, hits = self.kv.blocks()
        yield ("layerline_stage_kv_blocks", "KV cache blocks (paged cache)", "gauge", used, {"state": "used"})
        yield ("layerline_stage_kv_blocks", "", "gauge", cached, {"state": "cached"})
        yield ("layerline_stage_kv_blocks", "", "gauge", max(0, blocks - used - cached), {"state": "free"})
        yield (
            "layerline_stage_prefix_hit_tokens",
            "positions sessions found in the prefix cache instead of computing them",
            "counter",
            hits,
            {},
        )
        yield (
            "layerline_stage_kv_waits",
            "steps that waited for a KV block, and of them those refused",
            "counter",
            self.kv.waits,
            {"outcome": "waited"},
        )
        yield ("layerline_stage_kv_waits", "", "counter", self.kv.refused, {"outcome": "refused"})
        yield ("layerline_stage_kv_bytes_budget", "KV cache budget", "gauge", self.sessions.budget_bytes, {})
        weights = self.model.weight_bytes() if self.model is not None else 0
        yield ("layerline_stage_weight_bytes", "bytes of weights held (quantized as stored)", "gauge", weights, {})
        yield ("layerline_stage_resident_bytes", "the process's resident memory", "gauge", resident_bytes(), {})
        memory = device_memory(self.config.device)
        on = {"device": memory.name}
        yield ("layerline_stage_device_memory_bytes", "what the stage holds on its device", "gauge", memory.used, on)
        yield ("layerline_stage_device_memory_total_bytes", "its device's memory", "gauge", memory.total, on)
        yield ("layerline_stage_layers", "the layer range served, [start, end)", "gauge", start, {"bound": "start"})
        yield ("layerline_stage_layers", "", "gauge", end, {"bound": "end"})
        yield ("layerline_stage_draining", "1 while the stage drains", "gauge", float(self.draining), {})

    def _close(self, session_id: str, reason: str) -> bool:
        session = self.sessions.close(session_id, reason)
        if session is None:
            return False
        if session.results is not None:
            put_latest(session.results, None)  # ends the subscriber's stream
        self.relay.forget(session)
        forget(session)
        logger.info("session %s: %s", session_id[:8], reason, extra={"session": session_id[:8], "stage": self.label})
        return True

    # ---- streams -------------------------------------------------------------------------------------------------

    async def Push(
        self, request_iterator: AsyncIterator[stage_pb2.Step], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.PushReply]:
        replies: asyncio.Queue[stage_pb2.PushReply] = asyncio.Queue()
        reader = asyncio.create_task(self._read_steps(request_iterator, replies))
        get: asyncio.Future | None = None
        try:
            while True:
                get = asyncio.ensure_future(replies.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    yield get.result()
                    continue
                get.cancel()
                reader.result()  # the sender half-closed: what is queued still gets its replies (not awaited)
                return
        finally:
            # also when gRPC cancels the call (the client went, or re-routed): the pending get goes with it, or the
            # loop would find it destroyed while pending once its queue is collected
            reader.cancel()
            if get is not None:
                get.cancel()

    async def _read_steps(self, steps: AsyncIterator[stage_pb2.Step], replies: asyncio.Queue) -> None:
        async for step in steps:
            try:
                item = self._admit(step, replies)
            except LayerlineError as e:
                replies.put_nowait(self.relay.reply(step.session_id, step.seq, e, key=step.client_key))
                continue
            try:
                await self.kv.wait_for_blocks(item)  # a full paged cache: wait a little for a session to end
            except LayerlineError as e:
                replies.put_nowait(self.relay.reply(step.session_id, step.seq, e, key=step.client_key))
                continue
            await self.scheduler.take_slot()  # waits while too many steps are in flight: flow control up the chain
            self.scheduler.submit(item)

    def _admit(self, step: stage_pb2.Step, replies: asyncio.Queue) -> WorkItem:
        """The step's session (found, and the step's client's), then everything about the step that does not need
        the cache (admission.py)."""
        session = self._session(step.session_id, step.client_key)
        if self.stopping:  # the steps admitted already finish; a new one would hold the shutdown up
            raise UnavailableError(f"{self.label} is shutting down: the session must move to another stage")
        if not step.looped:  # failures of loop steps go back to the loop's stage, not to the client's stream
            session.reply_to = replies
        item = admit(step, session, replies, self.label)
        if session.model is not None and session.model.is_first:
            self.pace.note(session.pace, step, item.positions.numel(), time.perf_counter())
        return item

    async def Probe(self, request: stage_pb2.ProbeRequest, context: grpc.aio.ServicerContext) -> stage_pb2.ProbeReply:
        return stage_pb2.ProbeReply(received_bytes=len(request.payload))

    async def _last_stage_session(self, session_id: str, key: str, context: grpc.aio.ServicerContext) -> Session:
        """The session, for an RPC only the last stage answers."""
        session = self.sessions.peek(session_id)
        model = session.model if session is not None else self.model
        if model is None or not model.is_last:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{_label(model)} is not the last stage")
        try:
            return self._session(session_id, key)
        except (NotFoundError, PermissionDeniedError, UnavailableError) as e:
            await context.abort(*status_of(e))

    async def Subscribe(
        self, request: stage_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.Result]:
        session = await self._last_stage_session(request.session_id, request.client_key, context)
        if session.subscribed:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the session already has a subscriber")
        session.subscribed = True
        try:
            while True:
                result = await session.results.get()
                if session.parked is not None and session.results.qsize() <= self.config.loop_ahead // 2:
                    self._tasks.append(asyncio.create_task(self.relay.resume(session)))
                    self._tasks = [t for t in self._tasks if not t.done()]
                if result is None:
                    if session.close_reason != "closed by the client":
                        code, message = status_of(closed_error(session))
                        await context.abort(code, message)
                    return
                yield result
        finally:
            session.subscribed = False  # a client whose stream broke may subscribe again

    async def _sweep_loop(self) -> None:
        period = min(max(self.config.session_ttl / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            for sid in self.sessions.expired():
                self._close(sid, f"expired after {self.config.session_ttl:g} s without use")


def _label(model: StageModel | None) -> str:
    return f"layers {model.start}:{model.end}" if model is not None else "a stage with no layers yet"
