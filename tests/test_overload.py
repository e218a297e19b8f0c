"""Overload and leaks: many more sessions at once than a stage's KV budget holds are refused with
RESOURCE_EXHAUSTED (never an out-of-memory) while the admitted ones get transformers' tokens; 1000 sessions opened
and closed and 1000 generations cancelled mid-stream leave the stages' memory where it was."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from layerline.client import AsyncClient, ClientConfig, RPCError
from layerline.local_cluster import LocalCluster
from layerline.v1 import stage_pb2, stage_pb2_grpc
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=2, kv_heads=2)
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]
# one session of max_length 64 holds 64 positions x 2 (k, v) x 2 kv heads x 16 dims x 4 bytes = 16 KiB per layer
BUDGET = 10 * 16 * 1024  # bytes: room for 10 such sessions on a one-layer stage


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def info(address: str) -> stage_pb2.StageInfo:
    with grpc.insecure_channel(address) as channel:
        return stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_more_sessions_than_the_budget_holds_are_refused_and_the_admitted_are_exact(tiny_checkpoint, cache):
    """Contiguous: a session reserves its max_length at open, and those past the budget are refused there. Paged:
    a quarter of the budget is 10 blocks of 16 positions (one is the null block), a session's 15 positions take
    one, and with --kv-wait-ms 0 the steps that find no block are refused."""
    folder, ref = tiny_checkpoint(SPEC)
    expected = hf_greedy(ref, PROMPT, 8)
    if cache == "contiguous":
        args = ["--kv-cache-bytes", str(BUDGET), "--kv-block-size", "0"]
    else:
        args = ["--kv-cache-bytes", str(BUDGET // 4), "--kv-wait-ms", "0"]
    with LocalCluster(folder, [(0, 1), (1, 2)], threads=1, extra_args=args) as cluster:

        async def one(client: AsyncClient, hold: asyncio.Event) -> list[int] | RPCError:
            try:
                async with client.session(max_length=64) as s:
                    await hold.wait()  # every session is open at once before any generates
                    return (await s.generate(PROMPT, max_new_tokens=8, stop_token_ids=[], stream=False)).token_ids
            except RPCError as e:
                return e

        async def run() -> list:
            async with AsyncClient(cluster.route, config=ClientConfig(max_in_flight=64)) as client:
                hold = asyncio.Event()
                tasks = [asyncio.create_task(one(client, hold)) for _ in range(40)]
                await asyncio.sleep(3)  # the opens have landed or been refused
                hold.set()
                return await asyncio.gather(*tasks)

        outcomes = asyncio.run(asyncio.wait_for(run(), 120))
        admitted = [o for o in outcomes if not isinstance(o, RPCError)]
        refused = [o for o in outcomes if isinstance(o, RPCError)]
        assert 1 <= len(admitted) and len(admitted) + len(refused) == 40 and refused
        if cache == "contiguous":
            assert len(admitted) <= 10
        assert all(o == expected for o in admitted)
        said = "free" if cache == "contiguous" else "KV cache is full"
        assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and said in e.details for e in refused), refused[:2]
        assert all(p.poll() is None for p in cluster.processes)
        assert all(info(a).open_sessions == 0 and info(a).kv_bytes_used == 0 for a in cluster.route)
        assert all(info(a).kv_blocks_used == 0 for a in cluster.route)


def test_a_thousand_sessions_and_a_thousand_cancellations_leave_memory_as_it_was(tiny_checkpoint):
    folder, _ = tiny_checkpoint(SPEC)
    with LocalCluster(folder, [(0, 1), (1, 2)], threads=1) as cluster:

        async def churn(n: int) -> None:
            async with AsyncClient(cluster.route) as client:
                for _ in range(n):  # opened, used once and closed
                    async with client.session(max_length=64) as s:
                        await s.generate(PROMPT, max_new_tokens=1, stop_token_ids=[], stream=False)
                for _ in range(n):  # a generation the caller walks away from mid-stream
                    async for _piece in client.generate(PROMPT, max_new_tokens=32, stop_token_ids=[]):
                        break

        asyncio.run(asyncio.wait_for(churn(200), 300))  # warm-up: allocator pools, caches, channels
        before = [rss(p.pid) for p in cluster.processes]
        asyncio.run(asyncio.wait_for(churn(1000), 600))
        after = [rss(p.pid) for p in cluster.processes]
        print("stage RSS before / after, MiB:", [(b >> 20, a >> 20) for b, a in zip(before, after, strict=True)])
        assert all(a <= 1.05 * b for b, a in zip(before, after, strict=True)), (before, after)
        assert all(info(a).open_sessions == 0 and info(a).kv_bytes_used == 0 for a in cluster.route)
