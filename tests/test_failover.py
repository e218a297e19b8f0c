"""Generation survives a dying stage (all in subprocesses, real gRPC on 127.0.0.1): a stage of the session's chain
is killed (kill -9), or shut down on purpose (SIGTERM), mid-generation; the client finds which one stopped answering, asks the coordinator for a chain
without it (a replica stands in), replays the conversation there and goes on. The tokens are those of a run
without the fault: transformers' for greedy, the no-fault run's for seeded sampling. Without anywhere to go, the
caller gets a clear error naming the failed stage, not a hang."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest

from layerline.client import AsyncClient, ClientConfig, Failover, RPCError
from layerline.local_cluster import LocalCluster, LocalCoordinator
from layerline.v1 import coordinator_pb2 as pb
from layerline.v1 import coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=2, kv_heads=2)  # 2 layers: a chain of 2 stages at most, the others are replicas
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]
TOKENS = 40
# the loop runs at most 2 tokens ahead of the reader: a kill after a few tokens lands mid-generation
STAGE_ARGS = ["--loop-ahead", "2"]


def status(address: str) -> pb.ClusterStatus:
    with grpc.insecure_channel(address) as channel:
        return coordinator_pb2_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)


def wait_for_replicas(address: str, n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = status(address)
        ready = [s for s in st.stages if s.ready and s.serving_end > s.serving_start]
        loaded = all(
            s.ready and (s.serving_start, s.serving_end) == (s.assignment.start_layer, s.assignment.end_layer)
            for s in st.stages
            if s.assignment.end_layer > s.assignment.start_layer
        )  # the plan's chain too, not only the replicas (they may be ready first)
        if len(st.route.addresses) == 2 and sum(s.replica for s in ready) >= n and loaded:
            return
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def victim(address: str, chain: list[str], timeout: float = 15.0) -> str:
    """A stage of `chain` whose layers another ready stage also serves (waiting for one while the coordinator
    re-plans or a stage reloads)."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(address)
        stages = [s for s in st.stages if s.ready]
        for a in chain:
            me = next((s for s in stages if s.report.address == a), None)
            if me is None:
                continue
            span = (me.serving_start, me.serving_end)
            if any(s.report.address != a and (s.serving_start, s.serving_end) == span for s in stages):
                return a
        if time.monotonic() > deadline:
            raise AssertionError(f"no stage of {chain} has a ready twin: {st}")
        time.sleep(0.2)


async def generate(
    client: AsyncClient, kill=None, after: int = 4, **options
) -> tuple[list[int], int, list[str], list[str]]:
    """Stream one generation in a session; `kill(chain)` after `after` tokens. Returns (tokens, failovers, the
    chain before, the chain after)."""
    async with client.session(max_length=128) as s:
        before = [link.address for link in s.links]
        got = []
        async for piece in s.generate(PROMPT, max_new_tokens=TOKENS, stop_token_ids=[], **options):
            got.append(piece.token_id)
            if kill is not None and len(got) == after:
                kill(before)
        return got, s.failovers, before, [link.address for link in s.links]


@pytest.fixture
def cache_env(tmp_path):
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_a_killed_stage_is_routed_around_and_the_tokens_are_unchanged(tiny_checkpoint, cache_env):
    folder, ref = tiny_checkpoint(SPEC)
    expected = hf_greedy(ref, PROMPT, TOKENS)
    with LocalCoordinator(folder, heartbeat=0.5, settle=30, expect=4, objective="throughput") as coordinator:
        address = coordinator.address
        with LocalCluster(
            folder, [None] * 4, coordinator=address, threads=1, env=cache_env, extra_args=STAGE_ARGS
        ) as cluster:
            wait_for_replicas(address, 2)
            killed: list[str] = []

            def kill(chain: list[str]) -> None:  # kill -9
                a = victim(address, chain)
                cluster.processes[cluster.route.index(a)].kill()
                killed.append(a)

            def drain(chain: list[str]) -> None:  # SIGTERM: the stage shuts down on purpose
                a = victim(address, chain)
                cluster.processes[cluster.route.index(a)].terminate()
                killed.append(a)
                # the client feeds the tokens back itself here (below) and holds off while the stage shuts down,
                # so the generation is still running when it is gone (with the server loop the stages could run
                # it to its end before the signal is handled)
                time.sleep(0.5)

            async def run() -> None:
                moved: list[Failover] = []
                config = ClientConfig(step_timeout=10, failover_timeout=30, on_failover=moved.append)
                async with AsyncClient(coordinator=address, config=config) as client:
                    sampled = {"temperature": 1.0, "top_k": 20, "seed": 1234}
                    calm, moves, _, _ = await generate(client, **sampled)
                    assert moves == 0
                    # greedy, with speculative decoding: a stage dies mid-generation, the stream pauses and goes on
                    # with transformers' tokens (the new chain's caches hold no rejected proposals to roll back)
                    began = time.monotonic()
                    got, moves, before, after = await generate(client, kill, speculate="ngram")
                    assert got == expected and moves == 1, (got, expected)
                    assert killed[0] in before and killed[0] not in after and len(after) == 2
                    # the move is told once, with what a reader needs: which stage, how long, why that long
                    assert [m.failed for m in moved] == [(killed[0],)], moved
                    assert not moved[0].waited_for_plan  # its twin stood in: no re-plan to wait for
                    assert moved[0].replay_tokens >= len(PROMPT) + 4 and 0 < moved[0].seconds < 30
                    assert f"stage {killed[0]} stopped answering" in moved[0].note()
                    assert time.monotonic() - began < 30
                    # a stage drained on purpose (SIGTERM) mid-generation, seeded sampling: no error reaches the
                    # caller, and the tokens are those of the run without a fault (the draws go on where they were)
                    fed = ClientConfig(step_timeout=10, failover_timeout=30, server_loop=False)
                    async with AsyncClient(coordinator=address, config=fed) as feeder:
                        got, moves, before, after = await generate(feeder, drain, after=7, **sampled)
                    assert moves == 1 and killed[1] in before and killed[1] not in after
                    assert got == calm

            asyncio.run(asyncio.wait_for(run(), 150))


def test_with_a_fixed_route_a_dead_stage_is_a_clear_error_not_a_hang(tiny_checkpoint):
    folder, _ = tiny_checkpoint(SPEC)
    with LocalCluster(folder, [(0, 1), (1, 2)], threads=1, extra_args=STAGE_ARGS) as cluster:

        async def run() -> None:
            config = ClientConfig(step_timeout=10, failover_timeout=5)
            async with AsyncClient(cluster.route, config=config) as client:
                began = time.monotonic()
                with pytest.raises(RPCError) as err:
                    await generate(client, lambda chain: cluster.processes[1].kill())
                assert time.monotonic() - began < 20
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
                assert f"stage {cluster.route[1]} failed" in err.value.details
                assert "no other stage" in err.value.details

        asyncio.run(asyncio.wait_for(run(), 60))


def test_a_coordinator_killed_mid_generation_disturbs_nothing_and_the_stages_come_back(tiny_checkpoint, cache_env):
    folder, ref = tiny_checkpoint(SPEC)
    expected = hf_greedy(ref, PROMPT, TOKENS)
    first = LocalCoordinator(folder, heartbeat=0.5, settle=30, expect=2, objective="throughput")
    first.start()
    address = first.address
    try:
        # no link probes: the adopted chain stays (a plan from measured links could move the layers)
        with LocalCluster(
            folder,
            [None, None],
            coordinator=address,
            threads=1,
            env=cache_env,
            extra_args=[*STAGE_ARGS, "--probe-links", "0"],
        ) as pair:
            deadline = time.monotonic() + 90
            while len(status(address).route.addresses) != 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)

            def kill_coordinator(chain: list[str]) -> None:
                assert first.process is not None
                first.process.kill()  # kill -9: its soft state is gone
                first.process.wait()

            async def run() -> tuple[list[int], int, list[str], list[str]]:
                async with AsyncClient(coordinator=address, config=ClientConfig(step_timeout=10)) as client:
                    return await generate(client, kill_coordinator)

            got, moves, before, after = asyncio.run(asyncio.wait_for(run(), 60))
            assert got == expected and moves == 0 and before == after  # the token path never touched it
            # a new coordinator on the same address: the stages register again and it adopts their chain
            again = LocalCoordinator(
                folder,
                heartbeat=0.5,
                settle=30,
                expect=2,
                objective="throughput",
                extra_args=["--port", address.split(":")[1]],
            )
            again.start()
            try:
                deadline = time.monotonic() + 30
                while sorted(status(address).route.addresses) != sorted(pair.route):
                    assert time.monotonic() < deadline, status(address)
                    time.sleep(0.2)

                async def fresh() -> list[int]:
                    async with AsyncClient(coordinator=address) as client:
                        out = await client.generate(PROMPT, max_new_tokens=TOKENS, stop_token_ids=[], stream=False)
                        return out.token_ids

                assert asyncio.run(asyncio.wait_for(fresh(), 60)) == expected
            finally:
                again.stop()
    finally:
        first.stop()


def drain(address: str, wait: float) -> subprocess.Popen:
    """`layerline drain ADDRESS --wait S`, as a user runs it (it returns once the stage no longer answers)."""
    return subprocess.Popen(
        [sys.executable, "-m", "layerline.cli", "drain", address, "--wait", str(wait)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_layerline_drain_mid_generation_hands_the_session_over(tiny_checkpoint, cache_env):
    """The drained stage leaves the coordinator at once (long before its heartbeats would be missed), its session
    moves to the replica when the drain's wait is over, the caller sees no error and transformers' tokens, and the
    stage exits 0."""
    folder, ref = tiny_checkpoint(SPEC)
    expected = hf_greedy(ref, PROMPT, TOKENS)
    # heartbeats every 3 s: missing 3 of them takes 9 s, so a stage gone from the status within 3 s has left
    with LocalCoordinator(folder, heartbeat=3.0, settle=30, expect=4, objective="throughput") as coordinator:
        address = coordinator.address
        with LocalCluster(
            folder, [None] * 4, coordinator=address, threads=1, env=cache_env, extra_args=STAGE_ARGS
        ) as cluster:
            wait_for_replicas(address, 2)
            drained: list = []

            def start_drain(chain: list[str]) -> None:
                a = victim(address, chain)
                drained.append((a, drain(a, wait=1.0), time.monotonic()))
                deadline = time.monotonic() + 3
                while any(s.report.address == a for s in status(address).stages):
                    assert time.monotonic() < deadline, "the drained stage is still registered"
                    time.sleep(0.05)
                assert a not in status(address).route.addresses
                # the client feeds the tokens back itself here and holds off past the drain's wait, so the session
                # is still open when the wait is over and has to move (with the server loop, the stages would run
                # the generation to its end inside the wait)
                time.sleep(1.5)

            async def run() -> tuple:
                config = ClientConfig(step_timeout=10, server_loop=False)
                async with AsyncClient(coordinator=address, config=config) as client:
                    return await generate(client, start_drain, after=4)

            got, moves, before, after = asyncio.run(asyncio.wait_for(run(), 90))
            a, cli, _ = drained[0]
            out, err = cli.communicate(timeout=60)
            assert cli.returncode == 0, (out, err)
            assert "draining layers" in out and "no longer answers" in out, out
            assert got == expected and moves == 1 and a in before and a not in after
            process = cluster.processes[cluster.route.index(a)]
            assert process.wait(timeout=30) == 0


def test_a_draining_stage_refuses_new_sessions_and_lets_its_own_finish(tiny_checkpoint):
    folder, ref = tiny_checkpoint(SPEC)
    with LocalCluster(folder, [(0, 1), (1, 2)], threads=1) as cluster:

        async def run() -> None:
            async with AsyncClient(cluster.route) as client, client.session(max_length=64) as s:
                first = await s.generate(PROMPT, max_new_tokens=4, stop_token_ids=[], stream=False)
                async with grpc.aio.insecure_channel(cluster.route[1]) as channel:
                    stub = stage_pb2_grpc.StageStub(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.Drain(stage_pb2.DrainRequest(wait_seconds=-1), timeout=10)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    reply = await stub.Drain(stage_pb2.DrainRequest(wait_seconds=20), timeout=10)
                    assert reply.open_sessions == 1 and reply.stage == "layers 1:2"
                # no new session there ...
                with pytest.raises(RPCError) as err:
                    async with AsyncClient(cluster.route, config=ClientConfig(failover=False)) as other:
                        await other.generate(PROMPT, max_new_tokens=2, stream=False)
                assert err.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details
                # ... but the session it holds goes on from its cache, and once it is closed the stage goes
                more = await s.generate([3, 4], max_new_tokens=4, stop_token_ids=[], stream=False)
                assert first.token_ids == hf_greedy(ref, PROMPT, 4)
                assert more.token_ids == hf_greedy(ref, PROMPT + first.token_ids + [3, 4], 4)
            began = time.monotonic()
            assert await asyncio.to_thread(cluster.processes[1].wait, 15) == 0
            assert time.monotonic() - began < 10  # its last session closed: it did not wait the 20 s out

        asyncio.run(asyncio.wait_for(run(), 60))
