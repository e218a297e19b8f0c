"""The Coordinator over real gRPC (in-process server on 127.0.0.1, port 0) with stages played by hand: registration,
heartbeats, routes, status and dry-run plans, expiry of silent stages, and every bad request answered with the right
status while the coordinator keeps serving."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from layerline.checkpoint import load_config
from layerline.config import model_fingerprint
from layerline.coordinator.service import start_coordinator
from layerline.v1 import coordinator_pb2 as pb
from layerline.v1 import coordinator_pb2_grpc
from tiny_models import TinySpec

SPEC = TinySpec("llama", layers=6, kv_heads=2)
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> tuple[str, str]:
    folder, _ = tiny_checkpoint(SPEC)
    return folder, model_fingerprint(load_config(folder))


def report(address: str, fingerprint: str, per_layer: float = 1e-3, memory: int = 1 << 30, **kw) -> pb.StageReport:
    return pb.StageReport(
        address=address,
        model_fingerprint=fingerprint,
        device="cpu",
        dtype="float32",
        threads=1,
        decode_s_per_layer=per_layer,
        head_decode_s=1e-3,
        memory_bytes=memory,
        bytes_per_param=4.0,
        **kw,
    )


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def with_coordinator(model: str, body, **options):
    running = await start_coordinator(model, "127.0.0.1", 0, **options)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            await body(coordinator_pb2_grpc.CoordinatorStub(channel))
    finally:
        await running.stop()


async def status_code(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("the call should have failed")


def test_stages_register_heartbeat_and_clients_get_a_route(model):
    folder, fp = model

    async def body(stub) -> None:
        code, message = await status_code(stub.GetRoute(pb.RouteRequest(), timeout=TIMEOUT))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no stages" in message
        fast = await stub.Register(pb.RegisterRequest(stage=report("127.0.0.1:7001", fp, 1e-3)), timeout=TIMEOUT)
        slow = await stub.Register(pb.RegisterRequest(stage=report("127.0.0.1:7002", fp, 2e-3)), timeout=TIMEOUT)
        assert fast.heartbeat_seconds > 0 and fast.stage_id != slow.stage_id
        plan = await stub.Plan(pb.PlanRequest(), timeout=TIMEOUT)
        assert plan.boundaries[0] == 0 and plan.boundaries[-1] == SPEC.layers
        assert "127.0.0.1:7001: layers" in plan.explanation and "bottleneck" in plan.explanation
        # each stage learns its range from its heartbeat, loads it, and says it is ready
        ranges = {}
        for sid in (fast.stage_id, slow.stage_id):
            beat = await stub.Heartbeat(pb.HeartbeatRequest(stage_id=sid), timeout=TIMEOUT)
            a = beat.assignment
            assert a.plan_version >= 1 and a.end_layer > a.start_layer
            ranges[sid] = (a.start_layer, a.end_layer)
        assert ranges[fast.stage_id][1] - ranges[fast.stage_id][0] > ranges[slow.stage_id][1] - ranges[slow.stage_id][0]
        code, message = await status_code(stub.GetRoute(pb.RouteRequest(), timeout=TIMEOUT))
        assert code == grpc.StatusCode.ABORTED and "loading" in message  # a moment later it may work
        for sid, (a, b) in ranges.items():
            req = pb.HeartbeatRequest(stage_id=sid, serving_start=a, serving_end=b, ready=True, open_sessions=2)
            await stub.Heartbeat(req, timeout=TIMEOUT)
        route = await stub.GetRoute(pb.RouteRequest(), timeout=TIMEOUT)
        assert len(route.addresses) == 2 and list(route.boundaries) == [0, *sorted(b for _, b in ranges.values())]
        status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT)
        assert status.num_layers == SPEC.layers and len(status.stages) == 2 and status.predicted_bottleneck_s > 0
        assert all(s.ready and s.open_sessions == 2 and s.report.device == "cpu" for s in status.stages)
        assert list(status.route.addresses) == list(route.addresses)

    run(with_coordinator(folder, body, settle_s=0.0, objective="throughput"))


def test_bad_requests_get_clear_statuses_and_the_coordinator_keeps_serving(model):
    folder, fp = model

    async def body(stub) -> None:
        code, message = await status_code(stub.Plan(pb.PlanRequest(), timeout=TIMEOUT))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no stages" in message
        bad = [
            (report("127.0.0.1:1", "another-model"), grpc.StatusCode.FAILED_PRECONDITION, "another model"),
            (report("no-port", fp), grpc.StatusCode.INVALID_ARGUMENT, "host:port"),
            (report("127.0.0.1:1", fp, per_layer=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "decode_s"),
            (report("127.0.0.1:1", fp, per_layer=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "decode_s_per_layer"),
            (report("127.0.0.1:1", fp, serving_start=2, serving_end=99), grpc.StatusCode.INVALID_ARGUMENT, "serving"),
        ]
        for rep, code, words in bad:
            got, message = await status_code(stub.Register(pb.RegisterRequest(stage=rep), timeout=TIMEOUT))
            assert got == code and words in message, (rep, got, message)
        got, message = await status_code(stub.Heartbeat(pb.HeartbeatRequest(stage_id="nope"), timeout=TIMEOUT))
        assert got == grpc.StatusCode.NOT_FOUND and "register" in message
        # a stage far too small for the model: registered, but the plan says what is missing
        await stub.Register(pb.RegisterRequest(stage=report("127.0.0.1:2", fp, memory=1000)), timeout=TIMEOUT)
        got, message = await status_code(stub.Plan(pb.PlanRequest(), timeout=TIMEOUT))
        assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "more is needed" in message
        got, message = await status_code(stub.GetRoute(pb.RouteRequest(), timeout=TIMEOUT))
        assert got == grpc.StatusCode.FAILED_PRECONDITION and "does not fit" in message
        # still serving: a good stage gets placed
        ok = await stub.Register(pb.RegisterRequest(stage=report("127.0.0.1:3", fp)), timeout=TIMEOUT)
        assert ok.assignment.end_layer == SPEC.layers

    run(with_coordinator(folder, body, settle_s=0.0))


def test_garbage_bytes_are_rejected(model):
    folder, _ = model

    async def go() -> None:
        running = await start_coordinator(folder, "127.0.0.1", 0, settle_s=0.0)
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                call = channel.unary_unary("/layerline.v1.Coordinator/Register")  # raw bytes in, raw bytes out
                code, _ = await status_code(call(b"\xff\xff\xff\xff garbage", timeout=TIMEOUT))
                # grpc's own answer to a request it cannot deserialize (the servicer never sees it)
                assert code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT)
                assert status.num_layers == SPEC.layers
        finally:
            await running.stop()

    run(go())


def test_a_silent_stage_is_dropped_and_the_plan_moves_to_the_rest(model):
    folder, fp = model

    async def body(stub) -> None:
        a = await stub.Register(pb.RegisterRequest(stage=report("127.0.0.1:7001", fp)), timeout=TIMEOUT)
        b = await stub.Register(pb.RegisterRequest(stage=report("127.0.0.1:7002", fp)), timeout=TIMEOUT)
        assert b.assignment.end_layer - b.assignment.start_layer < SPEC.layers
        version = (await stub.Status(pb.StatusRequest(), timeout=TIMEOUT)).plan_version
        for _ in range(12):  # a keeps beating for 1.2 s; b said nothing after registering
            beat = await stub.Heartbeat(pb.HeartbeatRequest(stage_id=a.stage_id), timeout=TIMEOUT)
            await asyncio.sleep(0.1)
        status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT)
        assert [s.stage_id for s in status.stages] == [a.stage_id] and status.plan_version > version
        assert (beat.assignment.start_layer, beat.assignment.end_layer) == (0, SPEC.layers)

    run(with_coordinator(folder, body, heartbeat_s=0.2, miss_limit=3, settle_s=0.0, objective="throughput"))


def test_heartbeats_carry_links_and_pace_and_status_shows_predicted_and_measured_figures(model):
    """The default objective serves the tiny model from one stage; the heartbeat answer names the other stage to
    measure; the links and pace a stage reports come back in Status, with the plan in force's predicted figures, the
    rejected alternatives and the measured rates."""
    folder, fp = model

    async def body(stub) -> None:
        a = await stub.Register(pb.RegisterRequest(stage=report("127.0.0.1:7001", fp)), timeout=TIMEOUT)
        b = await stub.Register(pb.RegisterRequest(stage=report("127.0.0.1:7002", fp)), timeout=TIMEOUT)
        beat = await stub.Heartbeat(pb.HeartbeatRequest(stage_id=a.stage_id), timeout=TIMEOUT)
        assert list(beat.peers) == ["127.0.0.1:7002"]
        first = a if beat.assignment.end_layer else b
        link = pb.LinkReport(address="127.0.0.1:7002", rtt_s=4e-3, bytes_per_s=12.5e6, probes=3)
        pace = pb.PaceReport(decode_rounds=40, decode_seconds=1.0, prefill_tokens=100, prefill_seconds=0.25)
        for sid in (a.stage_id, b.stage_id):
            r = (await stub.Heartbeat(pb.HeartbeatRequest(stage_id=sid), timeout=TIMEOUT)).assignment
            await stub.Heartbeat(
                pb.HeartbeatRequest(
                    stage_id=sid,
                    serving_start=r.start_layer,
                    serving_end=r.end_layer,
                    ready=True,
                    links=[link] if sid == a.stage_id else [],
                    pace=pace if sid == first.stage_id else None,
                ),
                timeout=TIMEOUT,
            )
        status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT)
        assert status.objective == "latency"
        assert status.figures[0].label == "plan in force" and len(status.figures[0].addresses) == 1
        assert status.figures[0].decode_tokens_per_s > 0 and status.figures[0].prefill_tokens_per_s > 0
        assert any("pipelined" in f.label for f in status.figures[1:])
        by_id = {s.stage_id: s for s in status.stages}
        assert [(x.address, x.rtt_s) for x in by_id[a.stage_id].links] == [("127.0.0.1:7002", 4e-3)]
        # counters since the stage started: the first window is from there
        assert status.measured_decode_tokens_per_s == pytest.approx(40.0)
        assert status.measured_prefill_tokens_per_s == pytest.approx(400.0)
        rounds = pb.PaceReport(decode_rounds=100, decode_seconds=1.5, prefill_tokens=300, prefill_seconds=0.45)
        s = by_id[first.stage_id]
        await stub.Heartbeat(
            pb.HeartbeatRequest(
                stage_id=first.stage_id,
                serving_start=s.serving_start,
                serving_end=s.serving_end,
                ready=True,
                pace=rounds,
            ),
            timeout=TIMEOUT,
        )
        status = await stub.Status(pb.StatusRequest(), timeout=TIMEOUT)
        assert status.measured_decode_tokens_per_s == pytest.approx(60 / 0.5)  # the last window's
        assert status.measured_prefill_tokens_per_s == pytest.approx(200 / 0.2)
        plan = await stub.Plan(pb.PlanRequest(), timeout=TIMEOUT)
        assert plan.figures[0].label == "plan" and "objective latency: predicted decode" in plan.explanation
        bad = pb.LinkReport(address="", rtt_s=1.0)
        got, message = await status_code(
            stub.Heartbeat(pb.HeartbeatRequest(stage_id=a.stage_id, links=[bad]), timeout=TIMEOUT)
        )
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "link report" in message

    run(with_coordinator(folder, body, settle_s=0.0))
