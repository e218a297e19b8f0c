"""What the dashboard shows of a cluster (/api/cluster): the coordinator's Status of every stage, read as
`layerline status` reads it (status_view.py), joined with each stage's own Info (what it holds, its queue, its
counters), rates between samples (tokens per second, milliseconds per step) and a history of the last minutes for
the page's charts. The HTTP API (api.py) samples it every second in the background and serves the latest sample;
it knows nothing of HTTP.

Tokens per second come from the stages' own counters, so they count every client's traffic (SDK, CLI, other API
servers), not only this API's: a stage's figure is the positions it computed (prefill and decode), the cluster's the
tokens its last stages sampled."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from layerline.security import Security
from layerline.status_view import StageView
from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc

logger = logging.getLogger(__name__)


class ClusterView:
    def __init__(
        self,
        coordinator: str,
        route: list[str],
        security: Security,
        clock: Callable[[], float] = time.monotonic,
        history_s: float = 300.0,
    ) -> None:
        self.coordinator, self.route, self.security = coordinator, list(route), security
        self.clock = clock
        self._rates = Rates()  # per-second rates of each stage's counters and of the API's, between samples
        self.history = History(history_s)  # the charts' points
        self._latest: dict[str, Any] | None = None
        self._lock = asyncio.Lock()  # one snapshot at a time, however many pages poll
        self._failed = False

    async def latest(self, model_name: str, api_generated: int, max_age: float = 0.5) -> dict[str, Any]:
        """The latest snapshot when it is at most `max_age` seconds old, else a new one: pages polling at once
        share one, and the background sampler's (one a second) serve them in between."""
        async with self._lock:
            if self._latest is None or self.clock() - self._latest["now"] > max_age:
                self._latest = await self.snapshot(model_name, api_generated)
            return self._latest

    async def sample_forever(self, what: Callable[[], tuple[str, int]], period: float = 1.0) -> None:
        """Take a snapshot every `period` seconds (`what()` gives the model's name and the API's token count), so
        that the history has its points whether or not a page is open. Runs until cancelled."""
        while True:
            model_name, generated = what()
            try:
                async with self._lock:
                    self._latest = await self.snapshot(model_name, generated)
            except Exception:  # a bug here must not end the sampling (nor the server); said once
                if not self._failed:
                    logger.exception("the dashboard's sampler failed (it goes on)")
                self._failed = True
            await asyncio.sleep(period)

    async def snapshot(self, model_name: str, api_generated: int) -> dict[str, Any]:
        """The cluster as the dashboard shows it: the coordinator's view of every stage (when there is one) and
        each stage's own Info, with rates since the previous snapshot and the history of the last minutes."""
        now = self.clock()
        out: dict[str, Any] = {
            "model": model_name,
            "coordinator": self.coordinator,
            "num_layers": 0,
            "plan_version": 0,
            "predicted_bottleneck_ms": None,
            "route": [],
            "problem": "",
            "stages": [],
        }
        stages: list[dict[str, Any]] = []
        if self.coordinator:
            try:
                async with self.security.channel(self.coordinator) as channel:
                    st = await coordinator_pb2_grpc.CoordinatorStub(channel).Status(
                        coordinator_pb2.StatusRequest(), timeout=5
                    )
            except grpc.aio.AioRpcError as e:
                out["problem"] = f"the coordinator at {self.coordinator} does not answer: {e.details()}"
                st = None
            if st is not None:
                out.update(
                    num_layers=st.num_layers,
                    plan_version=st.plan_version,
                    predicted_bottleneck_ms=1e3 * st.predicted_bottleneck_s if st.predicted_bottleneck_s else None,
                    route=list(st.route.addresses),
                    problem=st.problem,
                )
                stages = [StageView.of(s).as_json() for s in st.stages]  # as `layerline status` reads them
        else:
            stages = [{"address": a, "ready": False} for a in self.route]
            out["route"] = list(self.route)
        infos = await asyncio.gather(*(self._info(s["address"]) for s in stages))
        for s, info in zip(stages, infos, strict=True):
            s["healthy"] = info is not None
            if info is None:
                s["tokens_per_s"] = s["sampled_per_s"] = s["ms_per_step"] = None
                continue
            out["num_layers"] = out["num_layers"] or info.num_layers
            s.setdefault("id", "")
            s.update(
                start=info.start_layer,
                end=info.end_layer,
                dtype=info.dtype,
                device=info.device,
                open_sessions=info.open_sessions,
                kv_bytes_used=info.kv_bytes_used,
                kv_bytes_total=info.kv_bytes_total,
                kv_blocks_total=info.kv_blocks_total,
                kv_blocks_used=info.kv_blocks_used,
                kv_blocks_cached=info.kv_blocks_cached,
                kv_block_size=info.kv_block_size,
                prefix_hit_tokens=info.prefix_hit_tokens,
                weight_bytes=info.weight_bytes,
                weights=info.weights,
                resident_bytes=info.resident_bytes,
                device_name=info.device_name,
                device_memory_used=info.device_memory_used,
                device_memory_total=info.device_memory_total,
                queued_steps=info.queued_steps,
                tokens_computed=info.tokens_computed,
                tokens_sampled=info.tokens_sampled,
            )
            if not self.coordinator:
                s["ready"] = info.end_layer > info.start_layer
            a = s["address"]
            s["tokens_per_s"] = self._rates.rate(a + " computed", info.tokens_computed, now)
            s["sampled_per_s"] = self._rates.rate(a + " sampled", info.tokens_sampled, now)
            # the time of a step, over the steps computed since the previous sample (None: no step since)
            seconds = self._rates.rate(a + " seconds", info.compute_seconds, now)
            steps = self._rates.rate(a + " steps", info.steps_computed, now)
            s["ms_per_step"] = 1e3 * seconds / steps if seconds is not None and steps else None
        # the chain first, in layer order, then replicas, then stages that serve nothing
        stages.sort(key=lambda s: (s.get("end", 0) <= s.get("start", 0), bool(s.get("replica")), s.get("start", 0)))
        out["stages"] = stages
        api_rate = self._rates.rate("api", api_generated, now)
        out["api"] = {"tokens_generated": api_generated, "tokens_per_s": api_rate or 0.0}
        sampled = [s["sampled_per_s"] for s in stages if s.get("sampled_per_s") is not None]
        out["tokens_per_s"] = sum(sampled) if sampled else None  # every client's generated tokens
        self.history.add(
            now,
            {
                "tokens_per_s": out["tokens_per_s"],
                "stages": {
                    s["address"]: {
                        k: s.get(k) for k in ("tokens_per_s", "ms_per_step", "open_sessions", "kv_bytes_used")
                    }
                    for s in stages
                },
            },
        )
        out["now"] = now
        out["history_s"] = self.history.span
        out["history"] = self.history.points()
        return out

    async def _info(self, address: str) -> stage_pb2.StageInfo | None:
        try:
            async with self.security.channel(address) as channel:
                return await stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=3)
        except grpc.aio.AioRpcError:
            return None


class Rates:
    """Per second rates of counters sampled now and then (each dashboard poll): a counter's rate is taken over at
    least `window` seconds since its previous sample, and polls closer together get the last rate again."""

    def __init__(self, window: float = 0.2) -> None:
        self.window = window
        self._last: dict[str, tuple[float, float, float | None]] = {}  # key -> (when, count, rate then)

    def rate(self, key: str, count: float, now: float) -> float | None:
        """None until a counter has been seen twice."""
        last = self._last.get(key)
        if last is not None and now - last[0] <= self.window:
            return last[2]
        rate = None if last is None else max(0.0, (count - last[1]) / (now - last[0]))
        self._last[key] = (now, count, rate)
        return rate


class History:
    """The points of the last `span` seconds, at most one per `spacing` seconds (a sample closer than that to the
    previous point is not kept, so that many polls do not crowd out the minutes): what the charts draw."""

    def __init__(self, span: float = 300.0, spacing: float = 0.9) -> None:
        self.span, self.spacing = span, spacing
        self._points: collections.deque[dict[str, Any]] = collections.deque()

    def add(self, now: float, point: dict[str, Any]) -> None:
        if self._points and now - self._points[-1]["t"] < self.spacing:
            return
        self._points.append({"t": now, **point})
        while now - self._points[0]["t"] > self.span:
            self._points.popleft()

    def points(self) -> list[dict[str, Any]]:
        return list(self._points)
