"""What the dashboard shows of a cluster (/api/cluster): the coordinator's Status of every stage, read as
`layerline status` reads it (status_view.py), joined with each stage's own Info (what it holds, its queue, its
counters) and rates of tokens per second between polls. The HTTP API (api.py) serves it; it knows nothing of
HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from layerline.security import Security
from layerline.status_view import StageView
from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc


class ClusterView:
    def __init__(self, coordinator: str, route: list[str], security: Security) -> None:
        self.coordinator, self.route, self.security = coordinator, list(route), security
        self._rates = Rates()  # tokens/s of each stage and of the API, from the dashboard's polls

    async def snapshot(self, model_name: str, api_generated: int) -> dict[str, Any]:
        """The cluster as the dashboard shows it: the coordinator's view of every stage (when there is one) and
        each stage's own Info, with tokens/s from the previous snapshot."""
        now = time.monotonic()
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
                s["tokens_per_s"] = None
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
            s["tokens_per_s"] = self._rates.rate(s["address"], info.tokens_computed, now)
        # the chain first, in layer order, then replicas, then stages that serve nothing
        stages.sort(key=lambda s: (s.get("end", 0) <= s.get("start", 0), bool(s.get("replica")), s.get("start", 0)))
        out["stages"] = stages
        api_rate = self._rates.rate("api", api_generated, now)
        out["api"] = {"tokens_generated": api_generated, "tokens_per_s": api_rate or 0.0}
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
        self._last: dict[str, tuple[float, int, float | None]] = {}  # key -> (when, count, rate then)

    def rate(self, key: str, count: int, now: float) -> float | None:
        """None until a counter has been seen twice."""
        last = self._last.get(key)
        if last is not None and now - last[0] <= self.window:
            return last[2]
        rate = None if last is None else max(0.0, (count - last[1]) / (now - last[0]))
        self._last[key] = (now, count, rate)
        return rate
