"""The paged KV cache on real stage servers: many more sessions than the budget would reserve, shared prompt
prefixes computed once along the whole chain (within one client key unless the stages share them), and a full
cache's documented behaviour (a step waits for a block, then RESOURCE_EXHAUSTED naming the budget). The oracle is
transformers running the same checkpoint (greedy tokens)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from stage_wire import infos

from layerline.client import AsyncClient, Client, ClientConfig, RPCError
from layerline.v1 import stage_pb2
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=4, kv_heads=2)
RANGES = [(0, 2), (2, 4)]
# bytes of one position of every layer of one stage (2 layers x K and V x 2 heads x 16 dims x float32)
PER_POSITION = 2 * 2 * 2 * 16 * 4


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint(SPEC)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_sessions_take_blocks_as_they_grow_and_many_more_are_admitted(tiny, stage_cluster):
    """A budget that reserves 2 sessions of max_length 512 serves 16 concurrent ones of that max_length using
    ~40 positions each, every one exact; their blocks come back when they end."""
    folder, ref = tiny
    budget = 2 * 512 * PER_POSITION
    route = stage_cluster(folder, RANGES, "--kv-cache-bytes", str(budget))
    first = infos(route)
    assert all(i.kv_block_size == 16 and i.kv_blocks_used == 0 for i in first)
    assert first[0].kv_bytes_per_token == PER_POSITION  # the constant above is this stage's
    prompts = [prompt(20 + i, seed=i) for i in range(16)]
    alone = [hf_greedy(ref, p, 20) for p in prompts]

    async def run() -> list[list[int]]:
        async with AsyncClient(route) as client:

            async def one(p: list[int]) -> list[int]:
                async with client.session(max_length=512) as s:
                    return (await s.generate(p, max_new_tokens=20, stop_token_ids=[], stream=False)).token_ids

            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(asyncio.wait_for(run(), 180)) == alone
    after = infos(route)
    assert all(i.kv_blocks_used == 0 and i.kv_bytes_used == 0 and i.open_sessions == 0 for i in after)
    # the contiguous cache refuses the third such session at open
    contiguous = stage_cluster(folder, RANGES, "--kv-cache-bytes", str(budget), "--kv-block-size", "0")
    with Client(contiguous) as client:
        a, b = client.session(max_length=512), client.session(max_length=512)
        a.open()
        b.open()
        with pytest.raises(RPCError) as e:
            client.session(max_length=512).open()
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        a.close()
        b.close()


def test_a_shared_prefix_is_computed_once_along_the_chain(tiny, stage_cluster):
    folder, ref = tiny
    route = stage_cluster(folder, RANGES)
    system = prompt(300, seed=7)
    a_prompt, b_prompt = system + prompt(5, seed=8), system + prompt(9, seed=9)
    with Client(route) as client:
        before = infos(route)
        out_a = client.generate(a_prompt, max_new_tokens=8, stop_token_ids=[], stream=False)
        mid = infos(route)
        out_b = client.generate(b_prompt, max_new_tokens=8, stop_token_ids=[], stream=False)
        after = infos(route)
    assert out_a.token_ids == hf_greedy(ref, a_prompt, 8)
    assert out_b.token_ids == hf_greedy(ref, b_prompt, 8)
    for i0, i1, i2 in zip(before, mid, after, strict=True):
        assert i1.prefix_hit_tokens == i0.prefix_hit_tokens  # a found nothing
        # b found the 18 full blocks of the system prompt (288 positions) on every stage, and computed the rest:
        # its prompt's other 21 positions and 7 decode steps (the last sampled token is never fed)
        assert i2.prefix_hit_tokens - i1.prefix_hit_tokens == 288
        assert i2.tokens_computed - i1.tokens_computed == len(b_prompt) - 288 + 7
        assert i1.tokens_computed - i0.tokens_computed == len(a_prompt) + 7
        assert i2.kv_blocks_used == 0 and i2.kv_blocks_cached > 0  # ended sessions' blocks stay cached


def test_prefixes_stay_within_a_client_key_unless_the_stages_share_them(tiny, stage_cluster):
    folder, ref = tiny
    text = prompt(100, seed=11)
    want = hf_greedy(ref, text, 4)
    for extra, shared in (((), False), (("--share-prefixes",), True)):
        route = stage_cluster(folder, RANGES, *extra)
        assert all(i.prefixes_shared == shared for i in infos(route))
        with Client(route) as first:
            assert first.generate(text, max_new_tokens=4, stop_token_ids=[], stream=False).token_ids == want
        before = infos(route)
        with Client(route) as second:  # another client key
            assert second._aio.client_key != first._aio.client_key
            assert second.generate(text, max_new_tokens=4, stop_token_ids=[], stream=False).token_ids == want
        hits = [b.prefix_hit_tokens - a.prefix_hit_tokens for a, b in zip(before, infos(route), strict=True)]
        assert hits == ([96, 96] if shared else [0, 0])


def test_the_client_can_leave_prefixes_alone(tiny, stage_cluster):
    folder, _ = tiny
    route = stage_cluster(folder, RANGES)
    text = prompt(64, seed=12)
    with Client(route, config=ClientConfig(reuse_prefixes=False)) as client:
        client.generate(text, max_new_tokens=2, stop_token_ids=[], stream=False)
        before = infos(route)
        client.generate(text, max_new_tokens=2, stop_token_ids=[], stream=False)
    assert [i.prefix_hit_tokens for i in infos(route)] == [i.prefix_hit_tokens for i in before]


def test_a_full_cache_waits_for_a_block_then_refuses_naming_the_budget(tiny, stage_cluster):
    folder, ref = tiny
    blocks = 8  # of 16 positions: 128 positions in all (and the null block)
    budget = (blocks + 1) * 16 * PER_POSITION
    route = stage_cluster(folder, RANGES, "--kv-cache-bytes", str(budget), "--kv-wait-ms", "0")
    with Client(route) as client:
        hog = client.session(max_length=512)
        hog.open()
        hog.generate(prompt(100, seed=1), max_new_tokens=1, stop_token_ids=[], stream=False)  # 7 blocks
        text = prompt(40, seed=2)  # 3 blocks: one is free
        with client.session(max_length=512) as s, pytest.raises(RPCError) as e:
            s.generate(text, max_new_tokens=4, stop_token_ids=[], stream=False)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV" in e.value.details and "--kv-cache-bytes" in e.value.details, e.value.details
        # the session holding the blocks is untouched: it goes on, exact
        more = hog.generate([5, 6], max_new_tokens=3, stop_token_ids=[], stream=False)
        hog.close()
        assert all(i.kv_blocks_used == 0 for i in infos(route))  # back to nothing held
        assert client.generate(text, max_new_tokens=4, stop_token_ids=[], stream=False).token_ids == hf_greedy(
            ref, text, 4
        )
    full = prompt(100, seed=1)
    first = hf_greedy(ref, full, 1)
    assert more.token_ids == hf_greedy(ref, full + first + [5, 6], 3)

    # with a wait, the step goes through once a session ends meanwhile
    waiting = stage_cluster(folder, RANGES, "--kv-cache-bytes", str(budget), "--kv-wait-ms", "60000")
    with Client(waiting) as client:
        hog = client.session(max_length=512)
        hog.open()
        hog.generate(prompt(100, seed=1), max_new_tokens=1, stop_token_ids=[], stream=False)
        got: dict = {}

        def other() -> None:
            try:
                got["ids"] = client.generate(text, max_new_tokens=4, stop_token_ids=[], stream=False).token_ids
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                got["error"] = e

        t = threading.Thread(target=other)
        t.start()
        t.join(1.0)  # it cannot finish while the hog holds the blocks
        assert t.is_alive()
        hog.close()
        t.join(120)
    assert got == {"ids": hf_greedy(ref, text, 4)}


def test_bad_prefix_requests_get_a_clear_status_and_the_stage_goes_on(tiny, stage_cluster):
    from stage_wire import KEY, assert_status, connect, open_session, rpc_error

    folder, ref = tiny
    route = stage_cluster(folder, RANGES)

    async def bad() -> None:
        async with connect(route) as stubs:
            last = stubs[1]
            sid = await open_session(last, 64, rows=2)

            def req(**kw) -> stage_pb2.PrefixRequest:
                return stage_pb2.PrefixRequest(**{"session_id": sid, "client_key": KEY, "tokens": [1] * 20, **kw})

            invalid, out_of_range = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE
            assert_status(await rpc_error(last.AttachPrefix(req(rows=[2]), timeout=10)), invalid, "rows")
            assert_status(await rpc_error(last.AttachPrefix(req(rows=[0, 0]), timeout=10)), invalid, "distinct")
            assert_status(await rpc_error(last.AttachPrefix(req(tokens=[10**6]), timeout=10)), invalid, "token ids")
            e = await rpc_error(last.AttachPrefix(req(tokens=[1] * 65), timeout=10))
            assert_status(e, out_of_range, "max_length of 64")
            e = await rpc_error(last.AttachPrefix(req(client_key="another-client-key-000"), timeout=10))
            assert_status(e, grpc.StatusCode.PERMISSION_DENIED, "another client")
            e = await rpc_error(last.AttachPrefix(req(session_id="nope"), timeout=10))
            assert_status(e, grpc.StatusCode.NOT_FOUND, "not found")
            assert (await last.AttachPrefix(req(), timeout=10)).positions == 0  # nothing cached: holds nothing

    asyncio.run(asyncio.wait_for(bad(), 60))
    text = prompt(30, seed=13)
    with Client(route) as client:  # the stage serves on
        assert client.generate(text, max_new_tokens=3, stop_token_ids=[], stream=False).token_ids == hf_greedy(
            ref, text, 3
        )


def test_the_conversation_so_far_is_a_cached_prefix_for_a_new_session(tiny, stage_cluster):
    """A new session that continues a conversation (as each chat completion of an API does) finds the turns before
    cached, the generated tokens included, and computes only what is new."""
    folder, ref = tiny
    route = stage_cluster(folder, RANGES)
    first = prompt(40, seed=21)
    with Client(route) as client:
        answer = client.generate(first, max_new_tokens=30, stop_token_ids=[], stream=False).token_ids
        second = first + answer + prompt(10, seed=22)
        before = infos(route)
        out = client.generate(second, max_new_tokens=5, stop_token_ids=[], stream=False)
        after = infos(route)
    assert out.token_ids == hf_greedy(ref, second, 5)
    # the first session fed 40 + 29 tokens: 4 full blocks of 16, prompt and answer alike, were cached
    hits = [b.prefix_hit_tokens - a.prefix_hit_tokens for a, b in zip(before, after, strict=True)]
    assert hits == [64, 64]
