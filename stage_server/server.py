"""`serve()`, what `layerline stage` runs: start the stage (running.py), with a coordinator measure it, register
and follow its plans (agent.py), print the ready line, and shut down on SIGTERM / SIGINT or the end of a drain.
`start_stage()` (running.py) is for tests and embedding."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable

from layerline import weight_cache
from layerline.errors import LayerlineError
from layerline.local_cluster import READY_PREFIX
from layerline.stage_server.agent import AgentConfig, CoordinatorAgent
from layerline.stage_server.capacity import cached_capacity, free_memory, read_capacity
from layerline.stage_server.config import StageConfig
from layerline.stage_server.fetch import WeightFetcher, prepare
from layerline.stage_server.running import RunningStage, load_layers, start_stage

__all__ = ["RunningStage", "load_layers", "print_ready", "print_serving", "serve", "start_stage"]

logger = logging.getLogger(__name__)


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
    probe_links: float = 10.0,
) -> None:
    """Run a stage until SIGTERM or SIGINT (or the end of a Drain), then shut down gracefully: a stage with a
    coordinator leaves it first, so routes stop naming it at once. With `coordinator`, the stage measures its
    capacity (cached on disk), registers, heartbeats and loads the layers it is assigned (`agent.py`). With a
    coordinator and no model (`config.model` empty), the model's description and the assigned layers' tensors come
    from the coordinator into the weight cache under `cache_dir` (`fetch.py`). With `capacity_file`, the stage reports
    the figures in that file (a capacity entry as the cache holds it) instead of measuring. Every `probe_links`
    seconds (0: never) it measures its links to the other stages the coordinator names, for the plan (`links.py`)."""
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
                    kv_block_size=config.kv_block_size,
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
                    probe_interval=probe_links,
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
