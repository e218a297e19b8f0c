"""Generation survives a dying stage (all in subprocesses, real gRPC on 127.0.0.1): a stage of the session's chain
is killed (kill -9), or shut down on purpose (SIGTERM), mid-generation; the client finds which one stopped answering, asks the coordinator for a chain
without it (a replica stands in), replays the conversation there and goes on. The tokens are those of a run
without the fault: transformers' for greedy, the no-fault run's for seeded sampling. Without anywhere to go, the
caller gets a clear error naming the failed stage, not a hang."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from layerline.client import AsyncClient, ClientConfig, RPCError
from layerline.local_cluster import LocalCluster, LocalCoordinator
from layerline.v1 import coordinator_pb2 as pb
from layerline.v1 import coordinator_pb2_grpc
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
        if len(st.route.addresses) == 2 and sum(s.replica for s in ready) >= n:
            return
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def victim(address: str, chain: list[str]) -> str:
    """A stage of `chain` whose layers another ready stage also serves."""
    stages = [s for s in status(address).stages if s.ready]
    for a in chain:
        me = next(s for s in stages if s.report.address == a)
        span = (me.serving_start, me.serving_end)
        if any(s.report.address != a and (s.serving_start, s.serving_end) == span for s in stages):
            return a
    raise AssertionError(f"no stage of {chain} has a ready twin: {stages}")


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
    with LocalCoordinator(folder, heartbeat=0.5, settle=30, expect=4) as coordinator:
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

            async def run() -> None:
                config = ClientConfig(step_timeout=10, failover_timeout=30)
                async with AsyncClient(coordinator=address, config=config) as client:
                    sampled = {"temperature": 1.0, "top_k": 20, "seed": 1234}
                    calm, moves, _, _ = await generate(client, **sampled)
                    assert moves == 0
                    # greedy: a stage dies mid-generation, the stream pauses and goes on with transformers' tokens
                    began = time.monotonic()
                    got, moves, before, after = await generate(client, kill)
                    assert got == expected and moves == 1, (got, expected)
                    assert killed[0] in before and killed[0] not in after and len(after) == 2
                    assert time.monotonic() - began < 30
                    # a stage drained on purpose (SIGTERM) mid-generation, seeded sampling: no error reaches the
                    # caller, and the tokens are those of the run without a fault (the draws go on where they were)
                    got, moves, before, after = await generate(client, drain, after=7, **sampled)
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
    first = LocalCoordinator(folder, heartbeat=0.5, settle=30, expect=2)
    first.start()
    address = first.address
    try:
        with LocalCluster(
            folder, [None, None], coordinator=address, threads=1, env=cache_env, extra_args=STAGE_ARGS
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
                folder, heartbeat=0.5, settle=30, expect=2, extra_args=["--port", address.split(":")[1]]
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
