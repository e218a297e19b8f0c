"""Starting and stopping a stage server: load the stage's layers, serve the Stage service and the standard gRPC
health service on one port, and shut down cleanly (in-flight steps finish or fail with a status, the compute
thread is joined). `serve()` is what `layerline stage` runs; `start_stage()` is for tests and embedding."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from layerline.checkpoint import load_stage, open_checkpoint
from layerline.errors import CheckpointError, LayerlineError
from layerline.local_cluster import READY_PREFIX
from layerline.stage_server.config import StageConfig
from layerline.stage_server.downstream import channel_options
from layerline.stage_server.service import StageService
from layerline.tokenizer import Tokenizer
from layerline.v1 import stage_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = "layerline.v1.Stage"


def model_fingerprint(config: object) -> str:
    """Stages of one pipeline must serve the same model: a hash of its config."""
    text = json.dumps(asdict(config), sort_keys=True, default=str)  # type: ignore[call-overload]
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunningStage:
    server: grpc.aio.Server
    service: StageService
    health: health_aio.HealthServicer
    address: str

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.service.config.grace if grace is None else grace)
        await self.service.stop()


async def start_stage(config: StageConfig) -> RunningStage:
    if config.threads:
        torch.set_num_threads(config.threads)
    ckpt = await asyncio.to_thread(open_checkpoint, config.model)
    try:
        model = await asyncio.to_thread(
            load_stage, config.model, config.start, config.end, config.dtype, config.device, ckpt
        )
        fingerprint = model_fingerprint(ckpt.config)
    finally:
        ckpt.close()
    try:
        tokenizer_json = (await asyncio.to_thread(Tokenizer.from_path, config.model)).to_json()
    except CheckpointError as e:
        logger.warning("no tokenizer served: %s", e)
        tokenizer_json = None
    service = StageService(model, config, os.path.basename(config.model.rstrip("/")), fingerprint, tokenizer_json)
    server = grpc.aio.server(options=channel_options(config.max_message_bytes))
    stage_pb2_grpc.add_StageServicer_to_server(service, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError:
        port = 0
    if port == 0:
        raise LayerlineError(f"cannot listen on {config.host}:{config.port} (port taken or address not available)")
    await server.start()
    await service.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = config.advertise or f"{config.host}:{port}"
    logger.info("stage %s:%s of %s serving on %s", config.start, config.end, config.model, address)
    return RunningStage(server, service, health, address)


async def serve(config: StageConfig, on_ready: Callable[[RunningStage], None] | None = None) -> None:
    """Run a stage until SIGTERM or SIGINT, then shut down gracefully."""
    stage = await start_stage(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(stage)
    await stop.wait()
    logger.info("stopping stage on %s", stage.address)
    await stage.stop()


def print_ready(stage: RunningStage) -> None:
    """The line launchers wait for: where the stage listens and what it serves."""
    m = stage.service.model
    info = {"address": stage.address, "start": m.start, "end": m.end, "pid": os.getpid()}
    sys.stdout.write(READY_PREFIX + json.dumps(info) + "\n")
    sys.stdout.flush()
