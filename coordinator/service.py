"""The Coordinator gRPC servicer and server: `registry.py` behind the RPCs of coordinator.proto.

Every request is checked before it touches the registry; a bad one gets INVALID_ARGUMENT / FAILED_PRECONDITION /
NOT_FOUND / RESOURCE_EXHAUSTED with a message naming the problem, and the coordinator keeps serving everyone else.
A background task drops stages that stopped heartbeating. The coordinator holds no model weights in memory: it plans
from the checkpoint's config (its fingerprint, its layer shapes), and reads tensors from the checkpoint only to
stream them to stage hosts that do not hold it (GetModel, FetchWeights: `weights.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry

from layerline.checkpoint import open_checkpoint
from layerline.config import ModelConfig, config_to_json, model_fingerprint
from layerline.coordinator.placement import (
    Alternative,
    Link,
    PlacementError,
    Plan,
    StageCapacity,
    assign_replicas,
    stage_cost,
)
from layerline.coordinator.registry import Registry, StageEntry, model_shape
from layerline.coordinator.weights import check_request, stream_tensors
from layerline.errors import BadInputError, CheckpointError, LayerlineError
from layerline.grpc_setup import serve_grpc
from layerline.grpc_status import status_of
from layerline.metrics import CallCounter, Snapshot, serve_metrics, uptime
from layerline.quant import WeightFormat, from_name, resolve
from layerline.security import Security
from layerline.tokenizer import Tokenizer
from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = "layerline.v1.Coordinator"
MAX_MESSAGE_BYTES = 4 << 20


def capacity_from_report(report: coordinator_pb2.StageReport) -> StageCapacity:
    for name in ("decode_s_per_layer", "decode_s_fixed", "head_decode_s", "prefill_s_per_layer_token"):
        if not math.isfinite(getattr(report, name)):
            raise BadInputError(f"report: {name} is not a finite number")
    if report.weights:
        try:
            from_name(report.weights)
        except ValueError as e:
            raise BadInputError(f"report: weights: {e}") from None
    return StageCapacity(
        name="",
        decode_s_per_layer=report.decode_s_per_layer,
        head_decode_s=report.head_decode_s,
        memory_bytes=report.memory_bytes,
        kv_bytes=report.kv_bytes,
        bytes_per_param=report.bytes_per_param or 4.0,
        weights=report.weights,
        fixed_s=max(report.decode_s_fixed, 0.0),
        prefill_s_per_layer=report.prefill_s_per_layer_token,
        kv_block_size=max(report.kv_block_size, 0),
        kv_bytes_per_layer_position=max(report.kv_bytes_per_layer_position, 0),
        wire_bytes=report.wire_bytes if report.wire_bytes in (1, 2, 4) else 4,
    )


def links_from(reports: Sequence[coordinator_pb2.LinkReport]) -> dict[str, Link]:
    links = {}
    for r in reports:
        if not r.address or not (math.isfinite(r.rtt_s) and math.isfinite(r.bytes_per_s)):
            raise BadInputError(f"link report {r.address!r}: an address and finite figures are needed")
        links[r.address] = Link(r.rtt_s, r.bytes_per_s)
    return links


def figures_of(plan: Plan, label: str, addresses: dict[str, str], note: str = "") -> coordinator_pb2.PlanFigures:
    return coordinator_pb2.PlanFigures(
        label=label,
        addresses=[addresses.get(a.name, a.name) for a in plan.assignments],
        boundaries=[0] + [a.end for a in plan.assignments],
        decode_tokens_per_s=plan.decode_tokens_per_s,
        prefill_tokens_per_s=plan.prefill_tokens_per_s,
        bottleneck_s=plan.bottleneck_s,
        note=note,
    )


def alternatives_of(
    alternatives: Sequence[Alternative], addresses: dict[str, str]
) -> list[coordinator_pb2.PlanFigures]:
    return [
        figures_of(alt.plan, alt.label, addresses)
        if alt.plan is not None
        else coordinator_pb2.PlanFigures(label=alt.label, note=alt.note)
        for alt in alternatives
    ]


def _assignment(entry: StageEntry) -> coordinator_pb2.Assignment:
    return coordinator_pb2.Assignment(
        plan_version=entry.assigned_version, start_layer=entry.assignment[0], end_layer=entry.assignment[1]
    )


@dataclass
class ServedModel:
    """The checkpoint a coordinator plans for, and serves to stage hosts that do not hold it (`weights.py`)."""

    path: str
    name: str
    config: ModelConfig
    fingerprint: str
    tokenizer_json: str  # empty: the checkpoint has no tokenizer
    stored_types: dict[str, str]  # HF name -> GGML type of a quantized checkpoint (empty: a float one)
    weights: str = "stored"  # the weight format stages that fetch the model and name none of their own use


def _describe(model: str) -> tuple[ModelConfig, dict[str, str] | None]:
    """The checkpoint's config and its own tensor types (None for a float checkpoint)."""
    ckpt = open_checkpoint(model)
    try:
        return ckpt.config, ckpt.stored_types()
    finally:
        ckpt.close()


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, registry: Registry, model: ServedModel) -> None:
        self.registry = registry
        self.model = model
        self.model_name = model.name
        self.reports: dict[str, coordinator_pb2.StageReport] = {}

    async def _fail(self, context: grpc.aio.ServicerContext, error: LayerlineError) -> None:
        code, message = status_of(error)
        await context.abort(code, message)

    async def Register(
        self, request: coordinator_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.RegisterResponse:
        r = request.stage
        try:
            entry = self.registry.register(
                r.address,
                r.model_fingerprint,
                capacity_from_report(r),
                (r.serving_start, r.serving_end),
                device=r.device,
                dtype=r.dtype,
                threads=r.threads,
                version=r.version,
            )
        except LayerlineError as e:
            await self._fail(context, e)
        self.reports = {sid: rep for sid, rep in self.reports.items() if sid in self.registry.stages}
        self.reports[entry.id] = r
        logger.info("stage %s registered from %s, assigned %s", entry.id, r.address, entry.assignment)
        return coordinator_pb2.RegisterResponse(
            stage_id=entry.id, assignment=_assignment(entry), heartbeat_seconds=self.registry.heartbeat_s
        )

    async def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        try:
            entry = self.registry.heartbeat(
                request.stage_id,
                (request.serving_start, request.serving_end),
                request.ready,
                request.open_sessions,
                request.kv_bytes_used,
                request.decode_steps,
                request.decode_seconds,
                request.weight_bytes,
                request.resident_bytes,
                (request.device_memory_used, request.device_memory_total),
                (request.kv_blocks_total, request.kv_blocks_used, request.kv_blocks_cached),
                links_from(request.links) if request.links else None,
                (
                    request.pace.decode_rounds,
                    request.pace.decode_seconds,
                    request.pace.prefill_tokens,
                    request.pace.prefill_seconds,
                ),
            )
        except LayerlineError as e:
            await self._fail(context, e)
        return coordinator_pb2.HeartbeatResponse(assignment=_assignment(entry), peers=self.registry.peers(entry.id))

    async def Leave(
        self, request: coordinator_pb2.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.LeaveResponse:
        entry = self.registry.stages.get(request.stage_id)
        known = self.registry.leave(request.stage_id)
        if known:
            logger.info("stage %s (%s) left", request.stage_id, entry.address)
        return coordinator_pb2.LeaveResponse(known=known)

    async def GetRoute(
        self, request: coordinator_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.Route:
        try:
            choice = self.registry.route(exclude=set(request.exclude))
        except LayerlineError as e:
            await self._fail(context, e)
        return coordinator_pb2.Route(
            addresses=choice.addresses, plan_version=choice.plan_version, boundaries=choice.boundaries
        )

    async def Status(
        self, request: coordinator_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ClusterStatus:
        reg = self.registry
        reg.expire()
        now = reg.clock()
        L = reg.model.num_layers
        out = coordinator_pb2.ClusterStatus(
            model_name=self.model_name, num_layers=L, plan_version=reg.plan_version, problem=reg.problem
        )
        for s in sorted(reg.stages.values(), key=lambda s: s.address):
            a, b = s.assignment
            predicted = stage_cost(s.capacity, b - a, a == 0, b == L) if b > a else 0.0
            out.stages.append(
                coordinator_pb2.StageStatus(
                    stage_id=s.id,
                    report=self.reports.get(s.id),
                    assignment=_assignment(s),
                    serving_start=s.serving[0],
                    serving_end=s.serving[1],
                    ready=s.ready,
                    open_sessions=s.open_sessions,
                    kv_bytes_used=s.kv_bytes_used,
                    kv_blocks_total=s.kv_blocks[0],
                    kv_blocks_used=s.kv_blocks[1],
                    kv_blocks_cached=s.kv_blocks[2],
                    seconds_since_heartbeat=now - s.last_seen,
                    predicted_decode_s=predicted,
                    replica=s.replica,
                    load_factor=s.load_factor,
                    weight_bytes=s.weight_bytes,
                    resident_bytes=s.resident_bytes,
                    device_memory_used=s.device_memory[0],
                    device_memory_total=s.device_memory[1],
                    links=[
                        coordinator_pb2.LinkReport(address=a, rtt_s=link.rtt_s, bytes_per_s=link.bytes_per_s)
                        for a, link in sorted(s.links.items())
                    ],
                )
            )
        out.objective = reg.objective
        if reg.plan is not None:
            out.predicted_bottleneck_s = reg.bottleneck()
            out.predicted_total_s = sum(s.predicted_decode_s for s in out.stages if not s.replica)
            addresses = {s.id: s.address for s in reg.stages.values()}
            current = reg.current()
            if current is not None:
                out.figures.append(figures_of(current, "plan in force", addresses))
                with contextlib.suppress(PlacementError):
                    fresh = reg.dry_run()
                    if fresh.ranges() != current.ranges():
                        note = (
                            "better by less than the margin that is worth a move"
                            if fresh.score() < current.score()
                            else ""
                        )
                        out.figures.append(figures_of(fresh, "a plan made now", addresses, note))
                    out.figures.extend(
                        alternatives_of(
                            [a for a in fresh.alternatives if a.plan is None or a.plan.ranges() != current.ranges()],
                            addresses,
                        )
                    )
            out.measured_decode_tokens_per_s, out.measured_prefill_tokens_per_s = reg.measured()
        with contextlib.suppress(LayerlineError):
            choice = reg.route()
            out.route.CopyFrom(
                coordinator_pb2.Route(
                    addresses=choice.addresses, plan_version=choice.plan_version, boundaries=choice.boundaries
                )
            )
        return out

    async def GetModel(
        self, request: coordinator_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ModelInfo:
        m = self.model
        return coordinator_pb2.ModelInfo(
            name=m.name,
            model_fingerprint=m.fingerprint,
            config_json=config_to_json(m.config),
            tokenizer_json=m.tokenizer_json,
            num_layers=m.config.num_layers,
            stored_types_json=json.dumps(m.stored_types) if m.stored_types else "",
            weights=m.weights,
        )

    async def FetchWeights(
        self, request: coordinator_pb2.FetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.WeightChunk]:
        m = self.model
        try:
            names, chunk = check_request(request, m.config, m.fingerprint)
        except LayerlineError as e:
            await self._fail(context, e)
        logger.info("streaming %d tensor(s) as %s to %s", len(names), request.dtype, context.peer())
        try:
            async for piece in stream_tensors(m.path, names, request.dtype, chunk):
                yield piece
        except LayerlineError as e:  # the checkpoint went missing or bad under the coordinator
            await self._fail(context, e)

    async def Plan(
        self, request: coordinator_pb2.PlanRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.PlanResponse:
        reg = self.registry
        reg.expire()
        try:
            plan = reg.dry_run()
        except PlacementError as e:
            code = grpc.StatusCode.FAILED_PRECONDITION if not reg.stages else grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, str(e) if reg.stages else "no stages have registered yet")
        addresses = {s.id: s.address for s in reg.stages.values()}
        text = plan.describe()
        spare = [s for s in reg.stages.values() if s.id in plan.left_out]
        held = {s.id: s.held for s in spare}
        for sid, (a, b) in assign_replicas(reg.model, plan, [s.capacity for s in spare], held).items():
            text += f"\n{sid}: replica of layers {a}:{b} (failover and a second chain for routes)"
        for sid, address in addresses.items():
            text = text.replace(f"{sid}:", f"{address}:")
        if self.model.config.moe_summary():
            text += "\n" + self.model.config.moe_summary()
        return coordinator_pb2.PlanResponse(
            stage_ids=[a.name for a in plan.assignments],
            addresses=[addresses[a.name] for a in plan.assignments],
            boundaries=[0] + [a.end for a in plan.assignments],
            predicted_bottleneck_s=plan.bottleneck_s,
            predicted_total_s=plan.total_s,
            explanation=text,
            figures=[figures_of(plan, "plan", addresses), *alternatives_of(plan.alternatives, addresses)],
        )


@dataclass
class RunningCoordinator:
    server: grpc.aio.Server
    service: CoordinatorService
    address: str
    sweeper: asyncio.Task
    metrics: str = ""  # host:port of its Prometheus /metrics ("" = not served)

    async def stop(self, grace: float = 1.0) -> None:
        self.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sweeper
        await self.server.stop(grace)


async def start_coordinator(
    model: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    heartbeat_s: float = 2.0,
    miss_limit: int = 3,
    settle_s: float = 4.0,
    expected_stages: int = 0,
    security: Security | None = None,
    metrics_port: int = -1,
    refine_s: float = 30.0,
    weights: WeightFormat | None = None,
    objective: str = "latency",
) -> RunningCoordinator:
    """Serve the coordinator (and the gRPC health and reflection services) on host:port; with `metrics_port` >= 0
    (0: any free port), Prometheus metrics on host:metrics_port."""
    security = security or Security()
    config, stored = await asyncio.to_thread(_describe, model)
    try:
        tokenizer_json = (await asyncio.to_thread(Tokenizer.from_path, model)).to_json()
    except CheckpointError as e:
        logger.warning("no tokenizer to serve to stage hosts: %s", e)
        tokenizer_json = ""
    registry = Registry(
        model_shape(config, stored),
        model_fingerprint(config),
        heartbeat_s=heartbeat_s,
        miss_limit=miss_limit,
        settle_s=settle_s,
        expected_stages=expected_stages,
        refine_s=refine_s,
        objective=objective,
    )
    served = ServedModel(
        model,
        os.path.basename(model.rstrip("/")),
        config,
        registry.fingerprint,
        tokenizer_json,
        stored or {},
        (weights or resolve()).name,
    )
    service = CoordinatorService(registry, served)
    metrics = CollectorRegistry()
    started = time.monotonic()
    metrics.register(Snapshot(lambda: _coordinator_metrics(registry, started)))
    served = await serve_grpc(
        lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(service, server),
        SERVICE_NAME,
        host,
        port,
        security=security,
        interceptors=[CallCounter(metrics, "layerline_coordinator")],
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    server, bound = served.server, served.port
    await served.mark_serving()

    async def sweep() -> None:
        while True:
            await asyncio.sleep(heartbeat_s / 2)
            gone = registry.expire()
            if gone:
                logger.warning("dropped %d stage(s) that stopped heartbeating: %s", len(gone), ", ".join(gone))

    sweeper = asyncio.create_task(sweep(), name="coordinator sweeper")
    metrics_address = serve_metrics(metrics, host, metrics_port) if metrics_port >= 0 else ""
    return RunningCoordinator(server, service, f"{host}:{bound}", sweeper, metrics_address)


def _coordinator_metrics(registry: Registry, started: float):
    stages = list(registry.stages.values())
    yield uptime(started)
    yield ("layerline_coordinator_stages", "stages registered", "gauge", len(stages), {})
    yield (
        "layerline_coordinator_ready_stages",
        "stages serving their layers",
        "gauge",
        sum(s.ready for s in stages),
        {},
    )
    yield (
        "layerline_coordinator_replicas",
        "stages holding a copy of a span",
        "gauge",
        sum(s.replica for s in stages),
        {},
    )
    yield ("layerline_coordinator_plan_version", "plans made since the start", "counter", registry.plan_version, {})
    bottleneck = registry.bottleneck()  # by the refined capacities, as Status reports it
    yield (
        "layerline_coordinator_predicted_bottleneck_seconds",
        "the plan's slowest stage per token (0: no plan)",
        "gauge",
        bottleneck,
        {},
    )
    for s in stages:
        labels = {"stage": s.address}
        yield ("layerline_coordinator_stage_open_sessions", "open sessions by stage", "gauge", s.open_sessions, labels)
        yield (
            "layerline_coordinator_stage_kv_bytes_used",
            "KV cache bytes used by stage",
            "gauge",
            s.kv_bytes_used,
            labels,
        )


async def serve_coordinator(
    model: str, host: str, port: int, on_ready: Callable[[RunningCoordinator], None] | None = None, **options: object
) -> None:
    """Run a coordinator until SIGTERM or SIGINT."""
    running = await start_coordinator(model, host, port, **options)  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(running)
    await stop.wait()
    await running.stop()
