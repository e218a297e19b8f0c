"""Starting and stopping a stage server: load the stage's layers, serve the Stage service and the standard gRPC
health service on one port, and shut down cleanly (in-flight steps finish or fail with a status, the compute
thread is joined). `serve()` is what `layerline stage` runs; `start_stage()` is for tests and embedding."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1.health import aio as health_aio

from layerline import weight_cache
from layerline.checkpoint import load_stage, open_checkpoint
from layerline.config import model_fingerprint
from layerline.errors import LayerlineError
from layerline.grpc_setup import serve_grpc
from layerline.local_cluster import READY_PREFIX
from layerline.metrics import CallCounter, serve_metrics
from layerline.model import StageModel
from layerline.quant import resolve
from layerline.quant.build import available as kernels_available
from layerline.stage_server.capacity import read_capacity
from layerline.stage_server.config import StageConfig
from layerline.stage_server.fetch import WeightFetcher, prepare
from layerline.stage_server.service import StageService
from layerline.v1 import stage_pb2_grpc
from layerline.weight_cache import FetchedCheckpoint

logger = logging.getLogger(__name__)

SERVICE_NAME = "layerline.v1.Stage"


@dataclass
class RunningStage:
    server: grpc.aio.Server
    service: StageService
    health: health_aio.HealthServicer
    address: str  # where others reach it (--advertise, else where it listens)
    fetcher: WeightFetcher | None = None  # a host without the checkpoint: layers come from the coordinator
    listen: str = ""  # host:port it listens on
    metrics: str = ""  # host:port of its Prometheus /metrics ("" = not served)

    async def stop(self, grace: float | None = None) -> None:
        """New RPCs are refused at once; admitted steps get up to `grace` seconds to finish. The service then
        closes its streams to other stages and its sessions (ending their subscribers' streams) while the server
        waits for its RPCs: the streams other stages keep open into this one end as they shut down too, instead of
        holding the server for the whole grace period."""
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(self.service.config.grace if grace is None else grace))
        try:
            await self.service.stop()
        finally:
            await stopping


async def start_stage(config: StageConfig) -> RunningStage:
    if config.threads:
        torch.set_num_threads(config.threads)
    ckpt = await asyncio.to_thread(open_checkpoint, config.model)
    try:
        stored_types = ckpt.stored_types()
        quantized = config.weights.quantizes or (config.weights.kind == "stored" and stored_types is not None)
        if quantized:
            why = await asyncio.to_thread(kernels_available)
            if why:  # the stage, its capacity and its reports all hold float32 weights then
                logger.warning("%s: this stage holds float32 weights instead of quantized ones", why)
                config.weights = resolve(torch.float32)
        model = None
        if config.end > config.start:  # else: no layers until a coordinator assigns some
            model = await asyncio.to_thread(_load_model, config, config.start, config.end, ckpt)
        model_config = ckpt.config
        fingerprint = model_fingerprint(model_config)
        fetched = isinstance(ckpt, FetchedCheckpoint)
        name = ckpt.name if fetched else os.path.basename(config.model.rstrip("/"))
    finally:
        ckpt.close()
    service = StageService(model, config, name, fingerprint, _tokenizer_loader(config.model, fetched), model_config)
    service.stored_types = stored_types
    served = await serve_grpc(
        lambda server: stage_pb2_grpc.add_StageServicer_to_server(service, server),
        SERVICE_NAME,
        config.host,
        config.port,
        security=config.security,
        interceptors=[CallCounter(service.metrics, "layerline_stage")],
        max_message_bytes=config.max_message_bytes,
    )
    server, health, port = served.server, served.health, served.port
    await service.start()
    await served.mark_serving()
    address = config.advertise or f"{config.host}:{port}"
    logger.info("stage %s of %s serving on %s", service.label, config.model, address)
    metrics = serve_metrics(service.metrics, config.host, config.metrics_port) if config.metrics_port >= 0 else ""
    return RunningStage(server, service, health, address, listen=f"{config.host}:{port}", metrics=metrics)


def _tokenizer_loader(model: str, fetched: bool) -> Callable[[], bytes | None]:
    """What gives the tokenizer JSON a stage serves (zlib-compressed), on the first request for it (clients ask
    the first stage of their route only). From a checkpoint it is built in a process of its own (`python -m
    layerline.tokenizer --zlib`): turning a GGUF file's vocabulary into a tokenizer takes some 40 MiB for a moment
    (SmolLM2's 49k tokens), and its JSON is 2 MiB (SmolLM2) to 9 MiB (Qwen2.5's 152k tokens), which would stay in
    the stage's memory a few times over while it is read, decoded and serialized; the stage receives and keeps it
    compressed (a tenth of that). None: the checkpoint has none."""

    def load() -> bytes | None:
        if fetched:
            text = FetchedCheckpoint(model).tokenizer_json()
            return None if text is None else zlib.compress(text.encode("utf-8"), 6)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "layerline.tokenizer", "--zlib", model], capture_output=True, timeout=300
            )
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("no tokenizer served: building it failed: %s", e)
            return None
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip()
            logger.warning("no tokenizer served: %s", err.splitlines()[-1] if err else f"exit {done.returncode}")
            return None
        return done.stdout

    return load


async def load_layers(stage: RunningStage, start: int, end: int) -> None:
    """Load layers [start, end) next to what the stage serves, then serve them to new sessions (running sessions
    finish on the layers they started with)."""
    c = stage.service.config
    if stage.fetcher is not None:
        await stage.fetcher.ensure(start, end)
    model = await asyncio.to_thread(_load_model, c, start, end)
    stage.service.swap_model(model)


def _load_model(config: StageConfig, start: int, end: int, ckpt=None) -> StageModel:
    model = load_stage(config.model, start, end, device=config.device, checkpoint=ckpt, weights=config.weights)
    logger.info(
        "layers %d:%d hold %.1f MiB of weights (%s)",
        start,
        end,
        model.weight_bytes() / (1 << 20),
        model.weight_summary(),
    )
    if config.pack_weights and model.quantized:
        raise LayerlineError(
            "--pack-weights is for float weights; this stage's weights are quantized "
            "(give --dtype float32 for float weights)"
        )
    if config.pack_weights:
        model.pack_weights()
        logger.info("packed weights: %.0f MiB more", model.packed_bytes / (1 << 20))
    return model


async def serve(
    config: StageConfig,
    on_ready: Callable[[RunningStage], None] | None = None,
    coordinator: str = "",
    max_memory: int = 0,
    remeasure: bool = False,
    cache_dir: str = "",
    connect_timeout: float = 20.0,
    capacity_file: str = "",
    on_layers: Callable[[RunningStage, str], None] | None = None,
) -> None:
    """Run a stage until SIGTERM or SIGINT (or the end of a Drain), then shut down gracefully: a stage with a
    coordinator leaves it first, so routes stop naming it at once. With `coordinator`, the stage measures its
    capacity (cached on disk), registers, heartbeats and loads the layers it is assigned (`agent.py`). With a
    coordinator and no model (`config.model` empty), the model's description and the assigned layers' tensors come
    from the coordinator into the weight cache under `cache_dir` (`fetch.py`). With `capacity_file`, the stage reports
    the figures in that file (a capacity entry as the cache holds it) instead of measuring."""
    pinned = read_capacity(capacity_file) if capacity_file else None  # a bad file fails before anything starts
    fetcher = None
    if not config.model:
        if not coordinator:
            raise LayerlineError("a stage without a model needs a coordinator to fetch it from")
        root = os.path.join(cache_dir, "weights") if cache_dir else weight_cache.default_root()
        # a stage that names no form of its own (no --dtype, no --quantize) takes the coordinator's
        own = None if config.weights.kind == "stored" else config.weights
        config.model, config.weights = await prepare(coordinator, root, own, connect_timeout, config.security)
        config.dtype = config.weights.dtype
        fetcher = WeightFetcher(coordinator, config.model, config.weights, security=config.security)
        logger.info("model %s comes from the coordinator at %s (cache: %s)", fetcher.fingerprint, coordinator, root)
    stage = await start_stage(config)
    stage.fetcher = fetcher
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    agent_task = None
    agent = None

    async def leave() -> None:  # drained or stopping: no more heartbeats, and the coordinator drops us at once
        if agent_task is not None and not agent_task.done():
            agent_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await agent_task
        if agent is not None:
            await agent.leave()

    stage.service.on_drain = leave
    ended = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(stage.service.drained.wait())}
    try:
        if coordinator:
            from layerline.stage_server.agent import AgentConfig, CoordinatorAgent
            from layerline.stage_server.capacity import cached_capacity, free_memory

            async def measure(again: bool) -> tuple:
                if pinned is not None:
                    return pinned, True
                return await asyncio.to_thread(
                    cached_capacity,
                    stage.service.model_config,
                    stage.service.fingerprint,
                    config.weights,
                    config.device,
                    stored=stage.service.stored_types,
                    remeasure=again,
                    cache_dir=os.path.join(cache_dir, "capacity") if cache_dir else None,
                )

            async def measure_again():
                return (await measure(False))[0]  # keyed by the new quota: measured unless seen before

            capacity, cached = await measure(remeasure)
            logger.info(
                "capacity (%s): %.3f ms/layer decode, %.1f us/layer/token prefill, %.2f ms LM head",
                "from " + capacity_file if pinned is not None else "cached" if cached else "measured",
                1e3 * capacity.decode_s_per_layer,
                1e6 * capacity.prefill_s_per_layer_token,
                1e3 * capacity.head_decode_s,
            )
            memory = max_memory or free_memory(config.device)[0]
            agent = CoordinatorAgent(
                stage,
                capacity,
                AgentConfig(
                    coordinator,
                    memory,
                    security=config.security,
                    on_layers=(lambda *_: on_layers(stage, coordinator)) if on_layers is not None else None,
                ),
                measure_again,
            )
            agent_task = asyncio.create_task(agent.run(), name="coordinator agent")
        if on_ready is not None:
            on_ready(stage)
        waiters = ended | ({agent_task} if agent_task is not None else set())
        while True:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if agent_task is None or agent_task not in done:
                break
            if not agent_task.cancelled():
                agent_task.result()  # the coordinator refused this stage: its message ends the stage
            waiters.discard(agent_task)  # left the coordinator for a drain: wait for the drain's end
    finally:
        for w in ended:
            w.cancel()
        await leave()
        if agent is not None:
            await agent.stop()
        logger.info("stopping stage on %s", stage.address)
        await stage.stop()


def print_ready(stage: RunningStage) -> None:
    """The line launchers wait for: where the stage listens and what it serves (a stage placed by a coordinator
    serves nothing yet: its start and end are null until `print_serving` says which layers it got)."""
    start, end = stage.service.serving
    placed = end <= start
    info = {
        "address": stage.address,
        "listen": stage.listen,
        "start": None if placed else start,
        "end": None if placed else end,
        "pid": os.getpid(),
    }
    if stage.metrics:
        info["metrics"] = stage.metrics
    sys.stdout.write(READY_PREFIX + json.dumps(info) + "\n")
    sys.stdout.flush()


def print_serving(stage: RunningStage, coordinator: str) -> None:
    """One line on stderr each time a coordinator's plan gives the stage layers and it serves them."""
    start, end = stage.service.serving
    layers = stage.service.model_config.num_layers if stage.service.model_config is not None else "?"
    print(
        f"layerline stage {stage.address}: serving layers {start}:{end} of {layers} (assigned by {coordinator})",
        file=sys.stderr,
        flush=True,
    )
