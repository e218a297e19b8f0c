"""A stage's side of the coordinator: register with the measured capacity, heartbeat, and load the layer range the
coordinator assigns - without a restart, while the gRPC server keeps running.

What happens to sessions when the range changes: sessions already open keep the layers they were opened with until
they end (each session holds its model, `Session.model`); new sessions get the new range. The route the coordinator
hands clients only includes stages that report their assigned range as loaded, so clients never meet a half-built
chain. Loading the new range while the old one is still referenced takes memory for both for a while.

When the CPU quota of the stage's cgroup changes, the stage measures itself again (in the background, heartbeating
meanwhile) and registers anew, so the plan follows its new capacity. When the coordinator is unreachable the stage keeps serving what it has and retries with backoff; when the
coordinator no longer knows it (it restarted) the stage registers again with the range it serves, which lets the
coordinator adopt the running chain as it is. A stage of another model is refused by the coordinator: that error
ends the stage with its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import torch

import layerline
from layerline.devices import device_name
from layerline.errors import LayerlineError
from layerline.security import Security
from layerline.stage_server.capacity import Capacity, cpu_quota, device_memory, resident_bytes
from layerline.stage_server.links import LinkProber
from layerline.stage_server.running import RunningStage, load_layers
from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    coordinator: str  # host:port
    memory_bytes: int  # what this stage may give the model (weights + KV cache)
    timeout: float = 10.0  # per call to the coordinator
    max_backoff: float = 10.0
    security: Security = field(default_factory=Security)
    on_layers: Callable[[int, int], None] | None = None  # called once the stage serves the layers it was assigned
    probe_interval: float = 10.0  # seconds between measurements of the links to the other stages (0: never)


class CoordinatorAgent:
    def __init__(
        self,
        stage: RunningStage,
        capacity: Capacity,
        config: AgentConfig,
        remeasure: Callable[[], Awaitable[Capacity]] | None = None,
    ) -> None:
        self.stage, self.capacity, self.config = stage, capacity, config
        self.remeasure = remeasure  # called when the CPU quota changes: the stage then registers anew
        self.stage_id: str | None = None
        self.heartbeat_s = 2.0
        self.assigned: tuple[int, int] = (0, 0)
        self.loading: asyncio.Task | None = None
        self.load_error = ""
        self.registered = asyncio.Event()
        self.remeasuring: asyncio.Task | None = None
        self.prober = LinkProber(
            config.security, stage.service.config.max_message_bytes, interval_s=config.probe_interval or 1.0
        )

    def report(self) -> coordinator_pb2.StageReport:
        c, service = self.capacity, self.stage.service
        mc, kv_dtype = service.model_config, service.config.dtype  # the KV cache is in the compute dtype
        start, end = service.serving
        return coordinator_pb2.StageReport(
            address=self.stage.address,
            model_fingerprint=service.fingerprint,
            device=c.device,
            dtype=c.dtype,
            threads=c.threads,
            decode_s_per_layer=c.decode_s_per_layer,
            decode_s_fixed=c.decode_s_fixed,
            prefill_s_per_layer_token=c.prefill_s_per_layer_token,
            head_decode_s=c.head_decode_s,
            memory_bytes=self.config.memory_bytes,
            kv_bytes=service.config.kv_cache_bytes,
            # packed weights hold a second copy of (nearly) every weight: each parameter costs twice its size
            bytes_per_param=torch.empty((), dtype=service.config.dtype).element_size()
            * (2 if service.config.pack_weights else 1),
            weights=service.config.weights.name,
            serving_start=start,
            serving_end=end,
            version=layerline.__version__,
            device_name=device_name(c.device),
            kv_block_size=service.config.kv_block_size,
            kv_bytes_per_layer_position=2
            * mc.num_kv_heads
            * mc.head_dim
            * torch.empty((), dtype=kv_dtype).element_size(),
            wire_bytes=torch.empty((), dtype=service.config.wire_dtype).element_size(),
        )

    async def run(self) -> None:
        """Until cancelled. Raises LayerlineError when the coordinator refuses this stage for good."""
        backoff = 0.5
        async with self.config.security.channel(self.config.coordinator) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            while True:
                try:
                    await self._exchange(stub)
                    backoff = 0.5
                    await asyncio.sleep(self.heartbeat_s)
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.NOT_FOUND:  # the coordinator forgot us: register again
                        self.stage_id = None
                        continue
                    if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
                        self.stage_id is None
                        and e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
                    ):
                        raise LayerlineError(
                            f"the coordinator at {self.config.coordinator} refused this stage: {e.details()}"
                        ) from None
                    logger.warning(
                        "coordinator %s: %s (retrying in %.1f s)", self.config.coordinator, e.details(), backoff
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.config.max_backoff)

    async def _exchange(self, stub: coordinator_pb2_grpc.CoordinatorStub) -> None:
        timeout = self.config.timeout
        self._check_quota()
        if self.stage_id is None:
            resp = await stub.Register(coordinator_pb2.RegisterRequest(stage=self.report()), timeout=timeout)
            self.stage_id, self.heartbeat_s = resp.stage_id, resp.heartbeat_seconds or self.heartbeat_s
            self.registered.set()
            logger.info("registered with %s as %s", self.config.coordinator, self.stage_id)
            self._apply(resp.assignment)
            return
        service = self.stage.service
        start, end = service.serving
        ready = end > start  # what it serves is loaded; an assignment being loaded shows in `serving` once swapped in
        memory = device_memory(service.config.device)
        resp = await stub.Heartbeat(
            coordinator_pb2.HeartbeatRequest(
                stage_id=self.stage_id,
                serving_start=start,
                serving_end=end,
                ready=ready,
                open_sessions=len(service.sessions),
                kv_bytes_used=service.kv.used_bytes,
                **dict(
                    zip(("kv_blocks_total", "kv_blocks_used", "kv_blocks_cached"), service.kv.blocks()[:3], strict=True)
                ),
                decode_steps=service.scheduler.decode_steps,
                decode_seconds=service.scheduler.decode_seconds,
                weight_bytes=service.model.weight_bytes() if service.model is not None else 0,
                resident_bytes=resident_bytes(),
                device_memory_used=memory.used,
                device_memory_total=memory.total,
                links=self.prober.reports(),
                pace=service.pace.report(),
            ),
            timeout=timeout,
        )
        self._apply(resp.assignment)
        if self.config.probe_interval > 0:
            self.prober.set_peers(resp.peers, own=self.stage.address)

    def _check_quota(self) -> None:
        """When the CPU quota changed, measure again in the background (heartbeats go on meanwhile, so the stage is
        not dropped as dead while it measures); once measured, register anew with the new figures (re-plan)."""
        task = self.remeasuring
        if task is not None and task.done():
            self.remeasuring = None
            try:
                self.capacity = task.result()
                self.stage_id = None  # register with the new figures: the coordinator re-plans
            except Exception as e:  # keep the old figures; try again on the next heartbeat
                logger.error("measuring again failed: %s", e)
            return
        if task is None and self.remeasure is not None and cpu_quota() != self.capacity.cpu_quota:
            logger.info("the CPU quota changed (%s -> %s): measuring again", self.capacity.cpu_quota, cpu_quota())
            self.remeasuring = asyncio.create_task(self.remeasure(), name="measure capacity again")

    def _apply(self, assignment: coordinator_pb2.Assignment) -> None:
        wanted = (assignment.start_layer, assignment.end_layer)
        if wanted[1] <= wanted[0] or wanted == self.stage.service.serving or wanted == self.assigned:
            return  # standby (keep what is loaded: it may still serve a chain), or nothing new
        if self.loading is not None and not self.loading.done():
            self.loading.cancel()  # a newer plan overtook the load under way
        self.assigned = wanted
        self.loading = asyncio.create_task(self._load(*wanted), name=f"load layers {wanted[0]}:{wanted[1]}")

    async def _load(self, start: int, end: int) -> None:
        logger.info("loading layers %d:%d as assigned by %s", start, end, self.config.coordinator)
        try:
            await load_layers(self.stage, start, end)
            self.load_error = ""
            logger.info("serving layers %d:%d as assigned by %s", start, end, self.config.coordinator)
            if self.config.on_layers is not None:
                self.config.on_layers(start, end)
        except (LayerlineError, OSError, RuntimeError) as e:
            self.load_error = f"could not load layers {start}:{end}: {e}"
            self.assigned = (0, 0)  # try again on the next heartbeat's assignment
            logger.error("%s", self.load_error)

    async def leave(self) -> None:
        """Tell the coordinator this stage is going (drained, or shutting down): it drops the stage at once instead
        of after missed heartbeats. Once; the heartbeat task must be stopped first."""
        sid, self.stage_id = self.stage_id, None
        if sid is None:
            return
        try:
            async with self.config.security.channel(self.config.coordinator) as channel:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                await stub.Leave(coordinator_pb2.LeaveRequest(stage_id=sid), timeout=min(self.config.timeout, 3.0))
            logger.info("left the coordinator at %s", self.config.coordinator)
        except grpc.aio.AioRpcError as e:
            logger.warning(
                "could not tell the coordinator %s that this stage leaves: %s", self.config.coordinator, e.details()
            )

    async def stop(self) -> None:
        await self.prober.stop()
        for task in (self.loading, self.remeasuring):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
