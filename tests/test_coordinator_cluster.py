"""Stages placed by a coordinator, end to end (all in subprocesses, real gRPC on 127.0.0.1): stages measure
themselves, register and load the layers they are assigned; clients ask the coordinator for the route and get
transformers' tokens; a joining stage makes the coordinator re-plan while a running session keeps its chain; a
killed stage is dropped and the survivors take over its layers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest

from layerline.client import Client, RPCError
from layerline.local_cluster import LocalCluster, LocalCoordinator
from layerline.stage_server.capacity import Capacity
from layerline.v1 import coordinator_pb2 as pb
from layerline.v1 import coordinator_pb2_grpc
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=6, kv_heads=2)
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]


def status(address: str) -> pb.ClusterStatus:
    with grpc.insecure_channel(address) as channel:
        return coordinator_pb2_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)


def wait_for_route(address: str, stages: int, timeout: float = 90.0) -> pb.Route:
    """Poll until the coordinator's route has `stages` stages, all ready."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = status(address)
        if len(last.route.addresses) == stages and all(s.ready for s in last.stages if s.assignment.end_layer):
            return last.route
        time.sleep(0.2)
    raise AssertionError(f"no route over {stages} stages within {timeout} s: {last}")


@pytest.fixture
def cache_env(tmp_path):
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # capacity measurements land here, not in ~/.cache


@pytest.fixture
def equal(tmp_path) -> list[str]:
    """Stage arguments that make every stage report the same figures and measure no links: what the coordinator
    decides then follows from the plan's rules, not from how busy the machine was while each stage measured itself
    or its links to the others."""
    figures = Capacity(
        decode_s_per_layer=4e-4,
        decode_s_fixed=5e-5,
        prefill_s_per_layer_token=5e-6,
        head_decode_s=3e-5,
        context=128,
        chunk=64,
        device="cpu",
        dtype="float32",
        threads=1,
        cpu_quota=None,
        measured_at=0.0,
        seconds=0.0,
    )
    path = tmp_path / "capacity.json"
    path.write_text(figures.to_json())
    return ["--capacity", str(path), "--probe-links", "0"]


def test_coordinator_places_stages_replans_on_join_and_leave(tiny_checkpoint, cache_env, equal, caplog):
    folder, ref = tiny_checkpoint(SPEC)
    expected = hf_greedy(ref, PROMPT, 12)
    with LocalCoordinator(folder, heartbeat=0.5, settle=30, expect=2, objective="throughput") as coordinator:
        address = coordinator.address
        with Client(coordinator=address) as early:
            with pytest.raises(RPCError) as err:
                early.connect()
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no stages" in err.value.details
        with LocalCluster(
            folder, [None, None], coordinator=address, threads=1, env=cache_env, extra_args=equal
        ) as pair:
            route = wait_for_route(address, 2)
            assert {s.report.decode_s_per_layer for s in status(address).stages} == {4e-4}  # the pinned figures
            # placed stages announce no layers when they start, and say on stderr which ones they serve once they do
            assert [(a["start"], a["end"]) for a in pair.announced] == [(None, None), (None, None)]
            spans = {a: route.boundaries[k : k + 2] for k, a in enumerate(route.addresses)}
            for i, stage in enumerate(pair.route):
                a, b = spans[stage]
                line = f"layerline stage {stage}: serving layers {a}:{b} of {SPEC.layers} (assigned by {address})"
                assert line in pair.log_tail(i), pair.log_tail(i)
            assert route.boundaries[0] == 0 and route.boundaries[-1] == SPEC.layers
            assert sorted(route.addresses) == sorted(pair.route)
            with Client(coordinator=address) as client:
                assert client.generate(PROMPT, max_new_tokens=12, stop_token_ids=[], stream=False).token_ids == expected
                with client.session(max_length=256) as s:
                    first = s.generate(PROMPT, max_new_tokens=6, stop_token_ids=[], stream=False).token_ids
                    # a third equal stage joins: 6 layers over 3 stages beats 3 over 2, so the coordinator re-plans
                    version = status(address).plan_version
                    with LocalCluster(
                        folder, [None], coordinator=address, threads=1, env=cache_env, extra_args=equal
                    ) as third:
                        route = wait_for_route(address, 3)
                        assert status(address).plan_version > version
                        assert third.route[0] in route.addresses
                        # the running session kept the chain it was opened on
                        second = s.generate([9, 8, 7], max_new_tokens=6, stop_token_ids=[], stream=False).token_ids
                        assert first == hf_greedy(ref, PROMPT, 6)
                        assert second == hf_greedy(ref, PROMPT + first + [9, 8, 7], 6)
                        with Client(coordinator=address) as fresh:
                            out = fresh.generate(PROMPT, max_new_tokens=12, stop_token_ids=[], stream=False)
                            assert out.token_ids == expected and fresh.route == list(route.addresses)
                        # a client connected before the re-plan still holds the old chain: the stages refuse its next
                        # session as out of date (they serve other layers now) and it asks for the new route
                        out = client.generate(PROMPT, max_new_tokens=12, stop_token_ids=[], stream=False)
                        assert out.token_ids == expected and client.route == list(route.addresses)
                        # one stage dies: the coordinator drops it after missed heartbeats, the others take its layers
                        third.processes[0].kill()
                        third.processes[0].wait()
                    route = wait_for_route(address, 2)
                    assert third.route[0] not in route.addresses
            with Client(coordinator=address) as after:
                assert after.generate(PROMPT, max_new_tokens=12, stop_token_ids=[], stream=False).token_ids == expected
            # re-plans in normal use log nothing alarming: not in the stages, not in the coordinator, not here
            for i in range(2):
                tail = pair.log_tail(i, 400)
                assert "Task was destroyed" not in tail and "Traceback" not in tail, tail
        assert "Task was destroyed" not in coordinator.log_tail(100_000)
    assert not [r for r in caplog.records if "Task was destroyed" in r.getMessage()]


def test_a_spare_stage_is_a_replica_that_takes_over_when_its_twin_dies(tiny_checkpoint, cache_env, equal):
    spec = TinySpec("llama", layers=2, kv_heads=2)  # 2 layers: a chain of 2 stages at most, the third is spare
    folder, ref = tiny_checkpoint(spec)
    expected = hf_greedy(ref, PROMPT, 8)
    # the plan stays (no refinement from load): the spare's twin is the plan's stage
    with LocalCoordinator(
        folder, heartbeat=0.5, settle=30, expect=3, objective="throughput", extra_args=["--refine", "0"]
    ) as coordinator:
        address = coordinator.address
        with LocalCluster(
            folder,
            [None, None, None],
            coordinator=address,
            threads=1,
            env=cache_env,
            extra_args=equal,
        ) as trio:

            def replica_ready() -> pb.StageStatus | None:
                st = status(address)
                spare = [s for s in st.stages if s.replica and s.ready]
                chain = wait_for_route(address, 2)
                return spare[0] if len(st.stages) == 3 and spare and len(chain.addresses) == 2 else None

            deadline = time.monotonic() + 90
            while (spare := replica_ready()) is None:
                assert time.monotonic() < deadline, status(address)
                time.sleep(0.2)
            span = (spare.serving_start, spare.serving_end)
            twin = next(s for s in status(address).stages if not s.replica and (s.serving_start, s.serving_end) == span)
            # the twin dies: the replica takes its place in the chain without loading anything
            trio.processes[trio.route.index(twin.report.address)].kill()
            route = wait_for_route(address, 2)
            deadline = time.monotonic() + 30
            while twin.report.address in route.addresses:
                assert time.monotonic() < deadline, status(address)
                time.sleep(0.2)
                route = wait_for_route(address, 2)
            assert spare.report.address in route.addresses
            # once the coordinator drops the dead twin (missed heartbeats), the plan has the spare in its place
            deadline = time.monotonic() + 30
            while True:
                st = status(address)
                if twin.stage_id not in {s.stage_id for s in st.stages}:
                    after = {s.report.address: s for s in st.stages}[spare.report.address]
                    break
                assert time.monotonic() < deadline, status(address)
                time.sleep(0.2)
            assert not after.replica and (after.serving_start, after.serving_end) == span and after.ready
            with Client(coordinator=address) as client:
                assert client.generate(PROMPT, max_new_tokens=8, stop_token_ids=[], stream=False).token_ids == expected


def test_by_default_a_model_that_fits_one_stage_is_served_by_one_and_the_links_are_measured(
    tiny_checkpoint, cache_env, equal
):
    """The default objective (one session's speed): two equal stages, the model fits either, so one serves it all
    and the other is a replica (a second chain); the stages measure the link between them and report it; after a
    generation with the server loop the first stage's measured pace shows in Status next to the prediction, and the
    CLI prints both with the alternatives the plan was chosen over."""
    folder, ref = tiny_checkpoint(SPEC)
    expected = hf_greedy(ref, PROMPT, 12)
    with LocalCoordinator(folder, heartbeat=0.5, settle=30, expect=2) as coordinator:
        address = coordinator.address
        links = [*equal[:2], "--probe-links", "1"]  # the same figures, links measured every second
        with LocalCluster(folder, [None, None], coordinator=address, threads=1, env=cache_env, extra_args=links):
            route = wait_for_route(address, 1)
            assert list(route.boundaries) == [0, SPEC.layers]
            deadline = time.monotonic() + 60
            while not all(s.links and s.links[0].rtt_s > 0 for s in status(address).stages):
                assert time.monotonic() < deadline, status(address)
                time.sleep(0.2)
            st = status(address)
            assert sorted(s.replica for s in st.stages) == [False, True]
            for s in st.stages:
                (link,) = s.links
                assert link.address != s.report.address and link.bytes_per_s > 0
            with Client(coordinator=address) as client:
                for _ in range(2):
                    out = client.generate(PROMPT, max_new_tokens=12, stop_token_ids=[], stream=False)
                    assert out.token_ids == expected
            deadline = time.monotonic() + 30
            while not status(address).measured_decode_tokens_per_s:
                assert time.monotonic() < deadline, status(address)
                time.sleep(0.2)
            st = status(address)
            assert st.measured_prefill_tokens_per_s > 0
            assert st.figures[0].label == "plan in force" and st.figures[0].decode_tokens_per_s > 0
            cli = subprocess.run(
                [sys.executable, "-m", "layerline.cli", "status", "--coordinator", address],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "COLUMNS": "80"},
            )
            assert cli.returncode == 0, cli.stderr
            assert "objective latency: plan in force" in cli.stdout and "measured at the first stage" in cli.stdout
            assert "rejected" in cli.stdout and "ms round trip" in cli.stdout
            assert max(len(line) for line in cli.stdout.splitlines()) <= 80
