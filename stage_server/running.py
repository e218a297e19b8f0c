"""A running stage: load its layers, serve the Stage service with health and reflection on one port
(`start_stage`), load other layers when a coordinator assigns them (`load_layers`), and stop cleanly (in-flight
steps finish or fail with a status, the compute thread is joined). For `serve()` (server.py), the coordinator
agent (agent.py), tests and embedding."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1.health import aio as health_aio

from layerline.checkpoint import load_stage, open_checkpoint
from layerline.config import model_fingerprint
from layerline.errors import LayerlineError
from layerline.grpc_setup import serve_grpc
from layerline.metrics import CallCounter, serve_metrics
from layerline.model import StageModel
from layerline.quant import resolve
from layerline.quant.build import available as kernels_available
from layerline.stage_server.config import StageConfig
from layerline.stage_server.drafting import load_draft
from layerline.stage_server.fetch import WeightFetcher
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
    drafter = None
    if config.draft:  # checked against the model's tokenizer now: a stage with a wrong draft does not start
        drafter = await asyncio.to_thread(load_draft, config.draft, config.model, model_config.vocab_size)
        logger.info("draft model %s proposes for the generation loops that ask (first stage)", drafter.name)
    service = StageService(
        model, config, name, fingerprint, _tokenizer_loader(config.model, fetched), model_config, drafter
    )
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
