"""The Stage gRPC servicer: sessions, steps in, results out.

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
import collections
import contextlib
import logging
import queue
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram

import layerline
from layerline import wire
from layerline.config import ModelConfig
from layerline.errors import (
    BadInputError,
    FailedPreconditionError,
    LayerlineError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from layerline.grpc_status import code_from_int, status_of
from layerline.metrics import Snapshot, uptime
from layerline.model import StageModel
from layerline.sampling import SamplingParams, draw_generator, sample
from layerline.stage_server.capacity import device_memory, resident_bytes
from layerline.stage_server.config import StageConfig
from layerline.stage_server.downstream import Downstream
from layerline.stage_server.sessions import LoopState, Sampler, Session, SessionTable, owns
from layerline.v1 import stage_pb2, stage_pb2_grpc

logger = logging.getLogger(__name__)

MAX_ROWS = 4096
SHUTDOWN = "the stage shut down"
MAX_STOP_IDS = 1024
INLINE_POSITIONS = 8  # a step of at most this many positions may be computed inline (see _submit)
INLINE_ALONE_S = 0.05  # ... when no other session has stepped here for this long
CLIENT_KEY_CHARS = (16, 256)  # the length a client key must have
DEFAULT_DRAIN_WAIT = 30.0
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)  # seconds (metrics)
MAX_DRAIN_WAIT = 3600.0


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


def sampling_from_wire(msg: stage_pb2.SamplingParams) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=float(msg.temperature),
            top_k=int(msg.top_k),
            top_p=float(msg.top_p) if msg.top_p > 0 else 1.0,
            repetition_penalty=float(msg.repetition_penalty) if msg.repetition_penalty > 0 else 1.0,
            seed=int(msg.seed) if msg.HasField("seed") else None,
        )
    except ValueError as e:
        raise BadInputError(f"sampling: {e}") from None


class StageService(stage_pb2_grpc.StageServicer):
    def __init__(
        self,
        model: StageModel | None,
        config: StageConfig,
        model_name: str,
        fingerprint: str,
        tokenizer: Callable[[], bytes | None] | bytes | None,
        model_config: ModelConfig | None = None,
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
        # steps travel loop -> compute thread through a plain thread-safe queue and come back with one
        # call_soon_threadsafe: the cheapest hand-off there is (an executor adds futures and callbacks per step)
        self._inbox: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._compute_thread, name="layerline-compute", daemon=True)
        self._slots: asyncio.Semaphore | None = None  # steps admitted and not yet sent on (flow control)
        self.in_flight = 0
        self.stopping = False  # shutting down: new steps, and subscribers of sessions already gone, hear UNAVAILABLE
        self.draining = False  # Drain: no new sessions; the running ones end or move, then the stage shuts down
        self.drained = asyncio.Event()  # set when a drain is over: the server then stops (server.py)
        self.on_drain = None  # async callable run when a drain begins (leave the coordinator), set by server.py
        self.downstreams: dict[str, Downstream] = {}
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.steps_done = 0
        self._queued = 0  # steps handed to the compute thread whose results were not dispatched yet
        self._decode_pass: float | None = None  # seconds per decode step here, lately (None: none computed yet)
        self.inline_steps = 0  # steps computed on the event loop (see _submit)
        self.decode_steps = 0  # one-row decode steps computed alone, and their compute (wall) seconds
        self.decode_seconds = 0.0
        self._last_session: Session | None = None  # the session of the latest step submitted, and since when
        self._switched = 0.0
        self.compute_seconds = 0.0  # compute thread time on steps (read by Info; written by that thread only)
        self.steps_computed = 0
        self.tokens_computed = 0  # token positions computed (rows x tokens of every step)
        self.tokens_sampled = 0  # last stage: tokens sampled
        self.batched_steps = 0  # of which ran in a forward pass shared with other sessions' steps
        self.peak_in_flight = 0  # the most steps admitted and not yet passed on, at once
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
        self.peak_results = 0  # the most results one subscriber has been behind

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
        self._slots = asyncio.Semaphore(self.config.max_queued_steps)
        self._thread.start()
        self._tasks = [asyncio.create_task(self._sweep_loop(), name="session sweeper")]

    async def stop(self) -> None:
        """After the gRPC server has stopped: let the admitted steps finish (within the grace period), then
        release everything and join the compute thread."""
        self.stopping = True
        deadline = self._loop.time() + self.config.grace
        while self.in_flight and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for d in self.downstreams.values():
            await d.close()
        for s in self.sessions.all():
            self._close(s.id, SHUTDOWN)
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join)

    # ---- unary RPCs ----------------------------------------------------------------------------------------------

    async def Info(self, request: stage_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> stage_pb2.StageInfo:
        m, c, mc = self.model, self.config, self.model_config
        start, end = self.serving
        memory = device_memory(c.device)
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
            kv_bytes_used=self.sessions.used_bytes,
            open_sessions=len(self.sessions),
            max_message_bytes=c.max_message_bytes,
            kv_bytes_per_token=m.cache_bytes(1, 1) if m is not None else 0,
            version=layerline.__version__,
            max_length=mc.max_position_embeddings,
            compute_seconds=self.compute_seconds,
            steps_computed=self.steps_computed,
            tokens_computed=self.tokens_computed,
            tokens_sampled=self.tokens_sampled,
            inline_steps=self.inline_steps,
            weight_bytes=m.weight_bytes() if m is not None else 0,
            weights=m.weight_summary() if m is not None else "",
            resident_bytes=resident_bytes(),
            device_name=memory.name,
            device_memory_used=memory.used,
            device_memory_total=memory.total,
            batched_steps=self.batched_steps,
            queued_steps=self.in_flight,
            peak_queued_steps=self.peak_in_flight,
            max_queued_steps=c.max_queued_steps,
            peak_queued_results=self.peak_results,
            max_loop_ahead=c.loop_ahead,
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
                    grpc.StatusCode.INVALID_ARGUMENT, f"wire_dtype {request.wire_dtype} is not a float type"
                )
        kv_bytes = m.cache_bytes(rows, request.max_length)
        try:
            session = self.sessions.open(
                rows,
                request.max_length,
                kv_bytes,
                lambda: m.new_cache(rows, request.max_length),
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
            "opened session %s (rows=%d, max_length=%d, %d bytes)",
            session.id[:8],
            rows,
            request.max_length,
            kv_bytes,
            extra={"session": session.id[:8], "stage": self.label, "peer": context.peer()},
        )
        return stage_pb2.OpenSessionResponse(
            session_id=session.id, kv_bytes=kv_bytes, ttl_seconds=self.config.session_ttl
        )

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
        yield ("layerline_stage_steps", "steps computed", "counter", self.steps_computed, {})
        yield (
            "layerline_stage_batched_steps",
            "steps computed in a pass with other sessions' steps",
            "counter",
            self.batched_steps,
            {},
        )
        yield (
            "layerline_stage_tokens",
            "token positions computed, and tokens sampled (last stage)",
            "counter",
            self.tokens_computed,
            {"kind": "computed"},
        )
        yield ("layerline_stage_tokens", "", "counter", self.tokens_sampled, {"kind": "sampled"})
        yield (
            "layerline_stage_inline_steps",
            "of the steps, those computed on the event loop (small, with the stage idle)",
            "counter",
            self.inline_steps,
            {},
        )
        yield ("layerline_stage_compute_seconds", "compute thread time on steps", "counter", self.compute_seconds, {})
        yield ("layerline_stage_queue_depth", "steps admitted and not yet passed on", "gauge", self.in_flight, {})
        yield ("layerline_stage_open_sessions", "open sessions", "gauge", len(self.sessions), {})
        yield (
            "layerline_stage_kv_bytes_used",
            "KV cache bytes held by sessions",
            "gauge",
            self.sessions.used_bytes,
            {},
        )
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
            _put_latest(session.results, None)  # ends the subscriber's stream
        if session.next_address in self.downstreams:
            self.downstreams[session.next_address].forget(session.next_session_id)
        logger.info("session %s: %s", session_id[:8], reason, extra={"session": session_id[:8], "stage": self.label})
        return True

    # ---- streams -------------------------------------------------------------------------------------------------

    async def Push(
        self, request_iterator: AsyncIterator[stage_pb2.Step], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.PushReply]:
        replies: asyncio.Queue[stage_pb2.PushReply] = asyncio.Queue()
        reader = asyncio.create_task(self._read_steps(request_iterator, replies))
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
            reader.cancel()

    async def _read_steps(self, steps: AsyncIterator[stage_pb2.Step], replies: asyncio.Queue) -> None:
        async for step in steps:
            try:
                item = self._admit(step, replies)
            except LayerlineError as e:
                replies.put_nowait(self._reply(step.session_id, step.seq, e, key=step.client_key))
                continue
            await self._take_slot()  # waits while too many steps are in flight: flow control up the chain
            self._submit(item)

    def _submit(self, item: WorkItem) -> None:
        """Hand an admitted step to the compute thread; or, when the stage is idle and the step is a decode step that
        takes less than `inline_compute_s` here (a small model, a fast device), compute it on the event loop right
        away: the two thread hand-offs (queue in, callback back) would cost more than the step, and with nothing
        else queued there is nothing for the loop to overlap with it meanwhile. Not while other sessions step too
        (their steps are better batched together on the compute thread). Steps of a session stay in order: a step
        is only computed inline when no earlier step is queued, computing or waiting to be dispatched."""
        limit = self.config.inline_compute_s
        now = time.monotonic()
        previous = self._last_session
        if item.session is not previous:
            if previous is not None and not previous.closed:  # another open session steps here too
                self._switched = now
            self._last_session = item.session
        if (
            limit > 0
            and self._queued == 0
            and now - self._switched > INLINE_ALONE_S
            and self._decode_pass is not None
            and self._decode_pass < limit
            and item.positions.numel() <= INLINE_POSITIONS
            and not item.step.burst
        ):
            began = time.perf_counter()
            out, error = self._compute_one(item)
            self._account([item], time.perf_counter() - began)
            self.inline_steps += 1
            self._dispatch(item, out, error)
            return
        self._queued += 1
        self._inbox.put(item)

    def _account(self, batch: list[WorkItem], took: float) -> None:
        """Bookkeeping of one forward pass (compute thread, or the loop for a step computed inline)."""
        self.compute_seconds += took
        self.pass_seconds.observe(took)
        self.steps_computed += len(batch)
        positions = sum(it.positions.numel() for it in batch)
        self.tokens_computed += positions
        if len(batch) == 1 and positions == 1 and batch[0].session.model is self.model:
            # a one-row decode step on the layers served now, as capacity is measured: the coordinator refines its
            # figures for this stage from these
            self.decode_steps += 1
            self.decode_seconds += took
        if positions <= INLINE_POSITIONS * len(batch):  # decode steps: what deciding to compute inline needs
            per_step = took / len(batch)
            self._decode_pass = per_step if self._decode_pass is None else 0.8 * self._decode_pass + 0.2 * per_step

    def _dispatch_queued(self, item: WorkItem, out, error) -> None:
        self._queued -= 1
        self._dispatch(item, out, error)

    async def _take_slot(self) -> None:
        await self._slots.acquire()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _admit(self, step: stage_pb2.Step, replies: asyncio.Queue) -> WorkItem:
        """Check everything about a step that does not need the cache, on the event loop."""
        session = self._session(step.session_id, step.client_key)
        if self.stopping:  # the steps admitted already finish; a new one would hold the shutdown up
            raise UnavailableError(f"{self.label} is shutting down: the session must move to another stage")
        m = session.model
        if not step.looped:  # failures of loop steps go back to the loop's stage, not to the client's stream
            session.reply_to = replies
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
            _check_loop(step)
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
        if m.is_first:
            if tokens is None:
                raise BadInputError(f"{self.label} is the first stage: the step needs tokens")
            x = tokens
        else:
            if not step.HasField("hidden"):
                raise BadInputError(f"{self.label} needs hidden states")
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
                    self._tasks.append(asyncio.create_task(self._resume(session)))
                    self._tasks = [t for t in self._tasks if not t.done()]
                if result is None:
                    if session.close_reason != "closed by the client":
                        code, message = status_of(self._closed_error(session))
                        await context.abort(code, message)
                    return
                yield result
        finally:
            session.subscribed = False  # a client whose stream broke may subscribe again

    # ---- compute -------------------------------------------------------------------------------------------------

    def _compute_thread(self) -> None:
        """Steps in arrival order. Decode steps of different sessions that are waiting at the same time run as one
        batched forward pass (`StageModel.forward_many`); everything else, one step at a time."""
        pending: list[WorkItem] = []
        while True:
            item = pending.pop(0) if pending else self._inbox.get()
            if item is None:
                return
            batch = [item]
            if self.config.max_batch > 1 and self._batchable(item):
                self._gather(batch, pending)
            began = time.perf_counter()
            results = self._compute_batch(batch) if len(batch) > 1 else [self._compute_one(item)]
            self._account(batch, time.perf_counter() - began)
            if len(batch) > 1:
                self.batched_steps += len(batch)
                self._mark_bursts(batch, results)
            for it, (out, error) in zip(batch, results, strict=True):
                self._loop.call_soon_threadsafe(self._dispatch_queued, it, out, error)

    def _gather(self, batch: list[WorkItem], pending: list[WorkItem]) -> None:
        """Add to `batch` the batchable steps waiting now, and those announced by `Step.burst` that are on their
        way (for up to `batch_wait` seconds): the steps one pass computed reach the next stage as separate messages
        a fraction of a millisecond apart, and a stage that took the first alone would split the group. A step that
        cannot join goes to `pending` (it runs after the batch: order is kept)."""
        expect, deadline = batch[0].step.burst, None
        while len(batch) < self.config.max_batch:
            try:
                if expect <= 0 or self.config.batch_wait <= 0:
                    nxt = self._inbox.get_nowait()
                else:
                    if deadline is None:
                        deadline = time.perf_counter() + self.config.batch_wait
                    nxt = self._inbox.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                return
            if nxt is None or not self._batchable(nxt, batch):
                pending.append(nxt)
                return
            batch.append(nxt)
            expect = nxt.step.burst if nxt.step.burst else expect - 1

    @staticmethod
    def _mark_bursts(batch: list[WorkItem], results: list[tuple]) -> None:
        """Compute thread, after a pass: tell each step this pass sends on how many more go to the same stage right
        after it (`Step.burst`), so that the receiver can batch them again."""
        outgoing = []
        for it, (out, error) in zip(batch, results, strict=True):
            if error is not None or out is None:
                continue
            if isinstance(out, stage_pb2.Step):
                outgoing.append((it.session.next_address, out))
            elif it.follow is not None:
                outgoing.append((it.follow_address, it.follow))
        left = collections.Counter(address for address, _ in outgoing)
        for address, step in outgoing:
            left[address] -= 1
            step.burst = left[address]

    @staticmethod
    def _batchable(item: WorkItem, batch: list[WorkItem] | None = None) -> bool:
        """A one-token step that may share a forward pass with the `batch` so far: same model, same kind of output,
        another session, nothing to truncate first."""
        step = item.step
        if item.session.closed or item.x.shape[1] != 1 or step.HasField("truncate") or item.targets is not None:
            return False
        if not batch:
            return True
        head = batch[0]
        return (
            item.session.model is head.session.model
            and step.sample == head.step.sample
            and all(item.session is not b.session for b in batch)
        )

    def _compute_one(self, item: WorkItem) -> tuple[stage_pb2.Step | stage_pb2.Result | None, Exception | None]:
        if item.session.closed:
            return None, None
        try:
            return self._compute(item), None
        except Exception as e:
            return None, e

    def _compute_batch(self, batch: list[WorkItem]) -> list[tuple]:
        """One forward pass for several sessions' steps; if it fails (one bad step), each runs alone so that only
        the bad one fails."""
        try:
            parts = [(it.x, it.positions, self._cache_of(it), it.rows) for it in batch]
            outs = batch[0].session.model.forward_many(parts, last_only=batch[0].step.sample)
        except Exception:
            return [self._compute_one(it) for it in batch]
        results = []
        for it, out in zip(batch, outs, strict=True):
            try:
                results.append((self._finish(it, out), None))
            except Exception as e:
                results.append((None, e))
        return results

    @staticmethod
    def _cache_of(item: WorkItem):
        cache = item.session.cache
        if cache is None:
            raise NotFoundError("the session was closed")
        return cache

    def _dispatch(self, item: WorkItem, out: stage_pb2.Step | stage_pb2.Result | None, error: Exception | None) -> None:
        """On the event loop, in step order: hand a computed step on (or its failure back)."""
        if error is None and item.session.closed:  # closed while the step waited or ran: its sender must hear of it
            error = self._closed_error(item.session)
        if error is not None:
            if not isinstance(error, LayerlineError):
                logger.error(
                    "step %d of session %s failed",
                    item.step.seq,
                    item.session.id[:8],
                    exc_info=error,
                    extra={"session": item.session.id[:8], "stage": self.label},
                )
            item.replies.put_nowait(self._reply(item.step.session_id, item.step.seq, error, key=item.step.client_key))
        elif out is not None:
            self.steps_done += 1
            self.step_latency.observe(time.perf_counter() - item.admitted)
            if isinstance(out, stage_pb2.Step):
                self._downstream(item.session.next_address).send(out, on_sent=self._release)
                return
            if item.session.results.qsize() >= self.config.max_queued_results:
                self._close(item.session.id, "its subscriber fell too far behind")
                self._release()
                return
            self.peak_results = max(self.peak_results, item.session.results.qsize() + 1)
            if item.follow is not None:
                if item.session.results.qsize() >= self.config.loop_ahead:
                    # the subscriber reads slower than the loop makes tokens: hold the loop's next step back until
                    # it has caught up (Subscribe resumes it), so a slow reader costs no memory and no session
                    item.session.parked = item
                    item.session.results.put_nowait(out)
                else:
                    self._send_follow(item, out)
                    return
            else:
                item.session.results.put_nowait(out)
        self._release()

    async def _resume(self, session: Session) -> None:
        """A paused loop's subscriber has caught up: its next step goes on (with a slot of its own again)."""
        item, session.parked = session.parked, None
        await self._take_slot()
        if session.closed:
            self._release()
            return
        self._send_follow(item, None)

    def _closed_error(self, session: Session) -> LayerlineError:
        """What a step or subscriber of a closed session is told: UNAVAILABLE when the stage is shutting down (the
        client may go elsewhere), NOT_FOUND otherwise."""
        if session.close_reason == SHUTDOWN:
            return UnavailableError(f"session closed: {SHUTDOWN}")
        return NotFoundError(f"session closed: {session.close_reason}")

    def _send_follow(self, item: WorkItem, result: stage_pb2.Result | None) -> None:
        """Last stage, event loop: the loop's next step goes to the first stage (before the result goes to the
        subscriber: the step is on the critical path, the result is not), holding on to the slot of the step that
        produced it. A one-stage route is its own first stage: the step is submitted here again, as a step that
        arrived (computed inline when the stage is idle, else queued for the compute thread), from a callback of its
        own so that the loop serves every other stream and the subscriber between two tokens."""
        follow, session = item.follow, item.session
        if follow.session_id != session.id:
            self._downstream(item.follow_address).send(follow, on_sent=self._release)
            self._publish(session, result)
            return
        try:
            nxt = self._admit(follow, item.replies)
        except LayerlineError as e:
            self._publish(session, result)
            code, message = status_of(e)
            self._loop_failed(session, code, message, self.label)
            self._release()
            return
        self._loop.call_soon(self._submit, nxt)
        self._publish(session, result)

    @staticmethod
    def _publish(session: Session, result: stage_pb2.Result | None) -> None:
        if result is not None:
            session.results.put_nowait(result)

    def _release(self) -> None:
        self.in_flight -= 1
        self._slots.release()

    def _compute(self, item: WorkItem) -> stage_pb2.Step | stage_pb2.Result | None:
        """On the compute thread: the stage's layers for one step, then sampling (last stage) or the wire message
        for the next stage."""
        step, session = item.step, item.session
        cache = self._cache_of(item)
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
        last_only = step.sample and item.targets is None
        out = session.model(item.x, item.positions, cache, item.rows, last_only=last_only)
        return self._finish(item, out)

    def _finish(self, item: WorkItem, out: torch.Tensor) -> stage_pb2.Step | stage_pb2.Result | None:
        """After the forward pass: the message for the next stage, or (last stage) sampling and the loop."""
        step, session = item.step, item.session
        if not session.model.is_last:
            onward = stage_pb2.Step(
                session_id=session.next_session_id,
                seq=step.seq,
                positions=step.positions,
                hidden=wire.encode(session.model.staging.to_host(out, session.wire_dtype)),
                rows=step.rows,
                sample=step.sample,
                client_key=step.client_key,
            )
            if step.HasField("tokens"):
                onward.tokens.CopyFrom(step.tokens)
            if step.HasField("targets"):
                onward.targets.CopyFrom(step.targets)
            if step.HasField("sampling"):
                onward.sampling.CopyFrom(step.sampling)
            if step.HasField("truncate"):
                onward.truncate = step.truncate
            if step.HasField("loop"):
                onward.loop.CopyFrom(step.loop)
            onward.looped = step.looped
            return onward
        sampler = session.sampler
        if item.sampling is not None:
            sampler.params, sampler.seed, sampler.draws = (
                item.sampling,
                item.sampling.base_seed(),
                item.step.sampling.draws,
            )
        if item.tokens is not None:
            if item.position_rows is not None:
                token_rows = item.tokens.tolist()
                for b, r in enumerate(item.rows):
                    sampler.history[r].extend(
                        t for t, p in zip(token_rows[b], item.position_rows[b], strict=True) if p >= 0
                    )
            else:
                for b, r in enumerate(item.rows):
                    valid = item.positions[b] >= 0
                    sampler.history[r].extend(item.tokens[b][valid].tolist())
        loop = None
        if step.HasField("loop"):
            spec = step.loop
            loop = session.loop = LoopState(
                spec.address,
                spec.session_id,
                frozenset(spec.stop_token_ids),
                {r: spec.max_new_tokens for r in item.rows},
                step.seq,
            )
        elif step.looped and session.loop is not None:
            loop = session.loop
            if loop.halted:  # the step that was travelling when Halt came: computed, nothing more sampled
                session.loop = None
                return self._loop_done(session, stage_pb2.Result(seq=loop.seq, rows=item.rows))
        if not step.sample:
            if item.targets is None:
                return None
            return stage_pb2.Result(seq=step.seq, rows=item.rows, logprobs=wire.encode(_logprobs(out, item.targets)))
        generator = None if sampler.params.greedy else draw_generator(sampler.seed, sampler.draws)
        sampler.draws += 1
        ids = sample(out[:, -1], sampler.params, generator, [sampler.history[r] for r in item.rows]).tolist()
        self.tokens_sampled += len(ids)
        result = stage_pb2.Result(seq=step.seq, token_ids=ids, rows=item.rows)
        if item.targets is not None:
            result.logprobs.CopyFrom(wire.encode(_logprobs(out, item.targets)))
        if loop is not None:
            self._continue_loop(item, loop, ids, result)
        return result

    def _continue_loop(self, item: WorkItem, loop: LoopState, ids: list[int], result: stage_pb2.Result) -> None:
        """Last stage, compute thread: the rows that go on become the next step for the first stage."""
        session, rows = item.session, []
        ends = [r[-1] for r in item.position_rows] if item.position_rows is not None else item.positions[:, -1].tolist()
        for b, r in enumerate(item.rows):
            loop.remaining[r] -= 1
            if ids[b] in loop.stop_ids or loop.remaining[r] <= 0 or ends[b] + 1 >= session.max_length:
                del loop.remaining[r]
            else:
                rows.append(b)
        if not rows or loop.halted:
            session.loop = None
            self._loop_done(session, result)
            return
        item.follow = stage_pb2.Step(
            session_id=loop.first_id,
            seq=loop.seq,
            positions=wire.int64_column([ends[b] + 1 for b in rows]),
            tokens=wire.int64_column([ids[b] for b in rows]),
            rows=[item.rows[b] for b in rows],
            sample=True,
            looped=True,
            client_key=session.owner,
        )
        item.follow_address = loop.address

    @staticmethod
    def _loop_done(session: Session, result: stage_pb2.Result) -> stage_pb2.Result:
        result.done = True
        result.lengths.extend(session.cache.lengths[r] for r in range(session.rows))
        return result

    # ---- links and replies ---------------------------------------------------------------------------------------

    def _downstream(self, address: str) -> Downstream:
        d = self.downstreams.get(address)
        if d is None:
            d = Downstream(
                address,
                self.config.max_message_bytes,
                self._on_downstream_reply,
                self._on_downstream_failure,
                self.config.security,
            )
            self.downstreams[address] = d
        return d

    def _reply(
        self, session_id: str, seq: int, exc: BaseException | None = None, code=None, message: str = "", key: str = ""
    ) -> stage_pb2.PushReply:
        if exc is not None:
            code, message = status_of(exc)
        self.step_errors.labels(code.name).inc()
        return stage_pb2.PushReply(
            session_id=session_id, seq=seq, code=code.value[0], message=message, stage=self.label, client_key=key
        )

    def _upstream_of(self, next_session_id: str, key: str) -> Session | None:
        """The session that sent the step a later stage answered: the one sending to that id, of the same client
        (another client's session may name the same next id: its steps are refused there, and the refusal is for
        that client only)."""
        return self.sessions.find(lambda s: s.next_session_id == next_session_id and owns(s, key))

    def _looping_to(self, first_id: str, key: str) -> Session | None:
        return self.sessions.find(lambda s: s.loop is not None and s.loop.first_id == first_id and owns(s, key))

    def _on_downstream_reply(self, reply: stage_pb2.PushReply) -> None:
        """A later stage rejected a step: pass it back to whoever sent us the session's steps."""
        session = self._upstream_of(reply.session_id, reply.client_key)
        if session is not None and session.reply_to is not None:
            relayed = stage_pb2.PushReply()
            relayed.CopyFrom(reply)
            relayed.session_id = session.id
            session.reply_to.put_nowait(relayed)
        elif (looping := self._looping_to(reply.session_id, reply.client_key)) is not None:
            self._loop_failed(looping, code_from_int(reply.code), reply.message, reply.stage)

    def _on_downstream_failure(self, next_session_ids: set[str], message: str) -> None:
        """The stream to a later stage broke: every session that sent steps on it hears of it."""
        for s in self.sessions.all():
            if s.next_session_id in next_session_ids and s.reply_to is not None:
                s.reply_to.put_nowait(
                    self._reply(s.id, 0, code=grpc.StatusCode.UNAVAILABLE, message=message, key=s.owner)
                )
            elif s.loop is not None and s.loop.first_id in next_session_ids:
                self._loop_failed(s, grpc.StatusCode.UNAVAILABLE, message, self.label)

    def _loop_failed(self, session: Session, code: grpc.StatusCode, message: str, stage: str) -> None:
        """A loop step failed past this stage: the loop ends and the subscriber is told why."""
        loop, session.loop = session.loop, None
        if loop is not None and not session.closed:
            _put_latest(
                session.results,
                stage_pb2.Result(seq=loop.seq, done=True, code=code.value[0], message=message, stage=stage),
            )

    async def _sweep_loop(self) -> None:
        period = min(max(self.config.session_ttl / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            for sid in self.sessions.expired():
                self._close(sid, f"expired after {self.config.session_ttl:g} s without use")


def _label(model: StageModel | None) -> str:
    return f"layers {model.start}:{model.end}" if model is not None else "a stage with no layers yet"


def _logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, T] float32 log-probabilities of `targets` under `logits` [B, T, vocab] (0 where the target is -1); one
    row at a time, so that only one row's log-softmax is ever held besides the logits."""
    out = torch.zeros(targets.shape, dtype=torch.float32)
    for b in range(targets.shape[0]):
        cols = (targets[b] >= 0).nonzero().flatten()
        if len(cols):
            lp = torch.log_softmax(logits[b, cols].float(), dim=-1)
            out[b, cols] = lp.gather(1, targets[b, cols, None]).flatten()
    return out


def _check_loop(step: stage_pb2.Step) -> None:
    loop = step.loop
    if not step.sample:
        raise BadInputError("loop: a step that starts a generation loop must sample")
    if loop.max_new_tokens <= 0:
        raise BadInputError(f"loop: max_new_tokens must be positive, got {loop.max_new_tokens}")
    if not loop.address or not loop.session_id:
        raise BadInputError("loop: address and session_id of the first stage are required")
    if len(loop.stop_token_ids) > MAX_STOP_IDS:
        raise BadInputError(f"loop: {len(loop.stop_token_ids)} stop token ids is more than {MAX_STOP_IDS}")


def _put_latest(queue: asyncio.Queue, item: object) -> None:
    """Put without waiting, dropping the oldest entry if the queue is full."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)
