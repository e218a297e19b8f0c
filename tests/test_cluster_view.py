"""What the dashboard computes from the stages' counters (cluster_view.py), with an injected clock and stage Infos
the test writes: rates between samples, time per step, the cluster's tokens/s as the sum of what every last stage
sampled (any client's traffic), the history's spacing and span, and the cached latest sample."""

from __future__ import annotations

import asyncio

import pytest

from layerline.cluster_view import ClusterView, History
from layerline.security import Security
from layerline.v1 import stage_pb2


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def view_of(counters: dict[str, dict[str, float]], clock: Clock, history_s: float = 300.0) -> ClusterView:
    """A view of a route whose stages answer Info with `counters[address]` as they are when asked."""
    view = ClusterView("", list(counters), Security(), clock=clock, history_s=history_s)

    async def info(address: str) -> stage_pb2.StageInfo | None:
        c = counters[address]
        if c.get("down"):
            return None
        return stage_pb2.StageInfo(
            start_layer=int(c["start"]),
            end_layer=int(c["end"]),
            num_layers=4,
            open_sessions=int(c.get("open", 0)),
            kv_bytes_used=int(c.get("kv", 0)),
            tokens_computed=int(c.get("computed", 0)),
            tokens_sampled=int(c.get("sampled", 0)),
            compute_seconds=c.get("seconds", 0.0),
            steps_computed=int(c.get("steps", 0)),
        )

    view._info = info  # type: ignore[method-assign]
    return view


def test_rates_time_per_step_and_the_clusters_tokens_per_second():
    clock = Clock()
    counters = {
        "a": {"start": 0, "end": 2, "computed": 100, "steps": 10, "seconds": 1.0},
        "b": {"start": 2, "end": 4, "computed": 100, "sampled": 50, "steps": 10, "seconds": 2.0},
    }
    view = view_of(counters, clock)
    first = asyncio.run(view.snapshot("m", 0))
    assert first["tokens_per_s"] is None and all(s["ms_per_step"] is None for s in first["stages"])
    clock.t += 2.0  # 2 s on: 40 more steps, 80 positions, 40 sampled at the last stage; a: 0.2 s, b: 0.6 s of compute
    counters["a"].update(computed=180, steps=50, seconds=1.2, open=3, kv=4096)
    counters["b"].update(computed=180, sampled=90, steps=50, seconds=2.6, open=3)
    snap = asyncio.run(view.snapshot("m", 0))
    a, b = (next(s for s in snap["stages"] if s["address"] == x) for x in "ab")
    assert a["tokens_per_s"] == pytest.approx(40.0) and b["tokens_per_s"] == pytest.approx(40.0)
    assert a["ms_per_step"] == pytest.approx(5.0) and b["ms_per_step"] == pytest.approx(15.0)
    assert snap["tokens_per_s"] == pytest.approx(20.0)  # what was generated: the last stage's sampled tokens
    last = snap["history"][-1]
    assert last["t"] == snap["now"] == clock.t and last["tokens_per_s"] == pytest.approx(20.0)
    assert last["stages"]["a"] == {
        "tokens_per_s": pytest.approx(40.0),
        "ms_per_step": pytest.approx(5.0),
        "open_sessions": 3,
        "kv_bytes_used": 4096,
    }
    clock.t += 1.0  # idle: no step since, so no time per step (a gap in the chart, not a zero)
    idle = asyncio.run(view.snapshot("m", 0))
    assert all(s["ms_per_step"] is None and s["tokens_per_s"] == 0.0 for s in idle["stages"])
    assert idle["tokens_per_s"] == 0.0
    counters["b"]["down"] = True
    clock.t += 1.0
    down = asyncio.run(view.snapshot("m", 0))
    assert down["history"][-1]["stages"]["b"]["tokens_per_s"] is None and down["tokens_per_s"] == 0.0


def test_the_history_keeps_one_point_a_second_over_its_span():
    h = History(span=10.0, spacing=0.9)
    for i in range(40):  # polls every half second for 20 s
        h.add(100.0 + 0.5 * i, {"i": i})
    ts = [p["t"] for p in h.points()]
    assert all(b - a >= 0.9 for a, b in zip(ts, ts[1:], strict=False))
    assert ts[-1] - ts[0] <= 10.0 and ts[-1] == 119.0 and len(ts) == 11


def test_the_latest_sample_is_served_while_fresh():
    clock = Clock()
    counters = {"a": {"start": 0, "end": 4, "sampled": 0}}
    view = view_of(counters, clock)
    taken = []
    snapshot = view.snapshot

    async def counted(model_name: str, generated: int):
        taken.append(clock.t)
        return await snapshot(model_name, generated)

    view.snapshot = counted  # type: ignore[method-assign]

    async def polls() -> None:
        for _ in range(5):  # five pages polling at once: one snapshot
            await asyncio.gather(*(view.latest("m", 0) for _ in range(5)))
        clock.t += 2.5
        await view.latest("m", 0)

    asyncio.run(polls())
    assert taken == [1000.0, 1002.5]
