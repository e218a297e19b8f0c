"""Sessions on real stage servers: concurrent sessions never see each other's cache, multi-turn sessions continue
from the cache, memory comes back on close / expiry / cancellation, seeded sampling repeats, and streamed text adds
up to the decoded tokens."""

from __future__ import annotations

import asyncio
import time
import zlib

import grpc
import pytest
import torch
from stage_wire import infos

import layerline.client.aio as client_aio
from layerline.client import AsyncClient, Client, RPCError
from layerline.pipeline import LocalPipeline
from layerline.sampling import SamplingParams
from layerline.tokenizer import Tokenizer
from layerline.v1 import stage_pb2, stage_pb2_grpc
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=4, kv_heads=2)
RANGES = [(0, 1), (1, 3), (3, 4)]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint(SPEC)


@pytest.fixture(scope="module")
def route(tiny, stage_cluster):
    return stage_cluster(tiny[0], RANGES)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 300, (int(torch.randint(1, 30, (), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def wait_until_free(route: list[str], timeout: float = 5.0) -> list[stage_pb2.StageInfo]:
    deadline = time.monotonic() + timeout
    while True:
        now = infos(route)
        if all(i.open_sessions == 0 and i.kv_bytes_used == 0 for i in now) or time.monotonic() > deadline:
            return now


def test_eight_concurrent_sessions_match_each_alone(tiny, route):
    _, ref = tiny
    prompts = _prompts(8, seed=1)
    alone = [hf_greedy(ref, p, 16) for p in prompts]

    async def run() -> list[list[int]]:
        async with AsyncClient(route) as client:
            outs = await asyncio.gather(
                *(client.generate(p, max_new_tokens=16, stop_token_ids=[], stream=False) for p in prompts)
            )
        return [o.token_ids for o in outs]

    before = [i.batched_steps for i in infos(route)]
    assert asyncio.run(asyncio.wait_for(run(), 120)) == alone
    after = wait_until_free(route)
    assert all(i.open_sessions == 0 for i in after)
    # decode steps of sessions waiting at a stage at the same time ran as one forward pass (and changed nothing)
    batched = [i.batched_steps - b for i, b in zip(after, before, strict=True)]
    print("steps run in shared forward passes, per stage:", batched)
    assert sum(batched) > 0, batched


def test_sessions_on_stages_with_packed_weights_match_transformers(tiny, stage_cluster):
    """`--pack-weights`: the batched decode steps of 8 sessions (and prefills of 4+ tokens) run through oneDNN's
    packed weights; every session still gets transformers' greedy tokens."""
    folder, ref = tiny
    packed = stage_cluster(folder, RANGES, "--pack-weights")
    prompts = _prompts(8, seed=3)

    async def run() -> list[list[int]]:
        async with AsyncClient(packed) as client:
            outs = await asyncio.gather(
                *(client.generate(p, max_new_tokens=12, stop_token_ids=[], stream=False) for p in prompts)
            )
        return [o.token_ids for o in outs]

    before = [i.batched_steps for i in infos(packed)]
    assert asyncio.run(asyncio.wait_for(run(), 120)) == [hf_greedy(ref, p, 12) for p in prompts]
    assert sum(i.batched_steps for i in wait_until_free(packed)) > sum(before)


def test_multi_turn_session_equals_generating_from_the_whole_history(tiny, route):
    _, ref = tiny
    first, second, third = _prompts(3, seed=2)
    with Client(route) as client:
        with client.session(max_length=128) as s:
            a = s.generate(first, max_new_tokens=8, stop_token_ids=[], stream=False).token_ids
            b = s.generate(second, max_new_tokens=8, stop_token_ids=[], stream=False).token_ids
            c = s.generate(third, max_new_tokens=8, stop_token_ids=[], stream=False).token_ids
            assert s.history == first + a + second + b + third + c
            during = infos(route)
            assert all(i.open_sessions == 1 and i.kv_bytes_used > 0 for i in during)
    assert a == hf_greedy(ref, first, 8)
    assert b == hf_greedy(ref, first + a + second, 8)
    assert c == hf_greedy(ref, first + a + second + b + third, 8)
    after = wait_until_free(route)
    assert all(i.open_sessions == 0 and i.kv_bytes_used == 0 for i in after)  # close frees at once


def test_multi_turn_chat_rolls_back_where_the_template_differs(tiny, route):
    """The chat template renders the model's answer as text: where that re-tokenizes differently from the tokens
    generated, the stages roll back to the common prefix; the result equals a fresh chat of the whole conversation."""
    conversation = [{"role": "user", "content": "hello world"}]
    with Client(route) as client:
        with client.session(max_length=256) as s:
            answer = s.chat(conversation, max_new_tokens=6, stop_token_ids=[], stream=False)
            conversation += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": "the capital"}]
            follow_up = s.chat(conversation, max_new_tokens=6, stop_token_ids=[], stream=False)
        fresh = client.chat(conversation, max_new_tokens=6, stop_token_ids=[], stream=False)
    assert follow_up.token_ids == fresh.token_ids


def test_seeded_sampling_repeats_and_matches_the_local_pipeline(tiny, route):
    folder, _ = tiny
    prompt = _prompts(1, seed=3)[0]
    opts = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, stop_token_ids=[])
    with Client(route) as client:
        a = client.generate(prompt, seed=11, stream=False, **opts).token_ids
        b = client.generate(prompt, seed=11, stream=False, **opts).token_ids
        c = client.generate(prompt, seed=12, stream=False, **opts).token_ids
    assert a == b and a != c
    local = LocalPipeline.load(folder, RANGES)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=11)
    assert list(local.generate(prompt, 12, params)) == a


def test_streamed_text_adds_up_and_stop_strings_cut(tiny, route):
    with Client(route) as client:
        tok = client.tokenizer()
        pieces = list(client.generate("the capital of", max_new_tokens=20, stop_token_ids=[]))
        ids = [p.token_id for p in pieces]
        text = "".join(p.text for p in pieces)
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert len(pieces) == 20
        if len(text) > 6:
            stop = text[3:6]
            cut = client.generate("the capital of", max_new_tokens=20, stop_token_ids=[], stop=[stop], stream=False)
            assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
            streamed = "".join(
                p.text for p in client.generate("the capital of", max_new_tokens=20, stop_token_ids=[], stop=[stop])
            )
            assert streamed == cut.text


def test_the_tokenizer_is_served_compressed_or_plain(tiny, route):
    folder, _ = tiny
    with grpc.insecure_channel(route[0]) as ch:
        stub = stage_pb2_grpc.StageStub(ch)
        packed = stub.GetTokenizer(stage_pb2.TokenizerRequest(zlib=True), timeout=30)
        plain = stub.GetTokenizer(stage_pb2.TokenizerRequest(), timeout=30)
    assert packed.tokenizer_json_zlib and not packed.tokenizer_json  # the stage keeps it compressed
    assert plain.tokenizer_json and not plain.tokenizer_json_zlib  # for clients that do not ask for zlib
    assert zlib.decompress(packed.tokenizer_json_zlib).decode() == plain.tokenizer_json
    assert Tokenizer.from_json(plain.tokenizer_json).encode("hi") == Tokenizer.from_path(folder).encode("hi")


def test_a_tokenizer_that_does_not_decompress_is_a_clear_error(monkeypatch):
    bad = stage_pb2.TokenizerResponse(tokenizer_json_zlib=b"not zlib at all")
    with pytest.raises(RPCError, match="stage:1 sent a tokenizer that does not decompress") as e:
        client_aio._tokenizer_text(bad, "stage:1")
    assert e.value.code == grpc.StatusCode.DATA_LOSS
    monkeypatch.setattr(client_aio, "TOKENIZER_MAX_BYTES", 1000)
    bomb = stage_pb2.TokenizerResponse(tokenizer_json_zlib=zlib.compress(b" " * 5000))
    with pytest.raises(RPCError, match="more than 1000 bytes"):
        client_aio._tokenizer_text(bomb, "stage:1")
    ok = stage_pb2.TokenizerResponse(tokenizer_json_zlib=zlib.compress('{"é": 1}'.encode()))
    assert client_aio._tokenizer_text(ok, "stage:1") == '{"é": 1}'


def test_stop_token_ends_generation(tiny, route):
    _, ref = tiny
    prompt = _prompts(1, seed=4)[0]
    free = hf_greedy(ref, prompt, 10)
    stop = free[4]
    with Client(route) as client:
        out = client.generate(prompt, max_new_tokens=10, stop_token_ids=[stop], stream=False)
    assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"


def test_breaking_out_of_a_stream_frees_every_stage_promptly(route):
    with Client(route) as client:
        pieces = []
        for piece in client.generate(_prompts(1, seed=5)[0], max_new_tokens=200, stop_token_ids=[]):
            pieces.append(piece)
            if len(pieces) == 4:
                assert all(x.open_sessions == 1 for x in infos(route))
                break
        t0 = time.monotonic()
        after = wait_until_free(route, timeout=5)
        assert all(i.open_sessions == 0 and i.kv_bytes_used == 0 for i in after)
        assert time.monotonic() - t0 < 5
        assert all(p.token_id >= 0 for p in pieces)


def test_cancelling_an_asyncio_task_frees_every_stage(route):
    async def run() -> None:
        async with AsyncClient(route) as client:
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in client.generate(_prompts(1, seed=6)[0], max_new_tokens=500, stop_token_ids=[]):
                    started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(run(), 60))
    after = wait_until_free(route, timeout=5)
    assert all(i.open_sessions == 0 and i.kv_bytes_used == 0 for i in after)


def test_session_expiry_frees_memory_and_later_use_is_not_found(tiny, stage_cluster):
    route = stage_cluster(tiny[0], [(0, 2), (2, 4)], "--session-ttl", "1")
    with Client(route) as client:
        s = client.session(max_length=64)
        s.open()
        s.generate([5, 6, 7], max_new_tokens=2, stop_token_ids=[], stream=False)
        assert all(i.open_sessions == 1 for i in infos(route))
        time.sleep(2.0)
        assert all(i.open_sessions == 0 and i.kv_bytes_used == 0 for i in infos(route))
        with pytest.raises(RPCError) as e:
            s.generate([8], max_new_tokens=2, stop_token_ids=[], stream=False)
        assert e.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
        s.close()


def test_budget_refusal_is_resource_exhausted_and_says_how_much(tiny, stage_cluster):
    """The contiguous cache (--kv-block-size 0) reserves a session's max_length at open (the paged cache's
    pressure: test_paged_stage.py)."""
    route = stage_cluster(tiny[0], [(0, 4)], "--kv-cache-bytes", "64KiB", "--kv-block-size", "0")
    per_token = infos(route)[0].kv_bytes_per_token
    assert 512 * per_token > 65536
    with Client(route) as client:
        with pytest.raises(RPCError) as e:
            client.session(max_length=512).open()  # 512 positions take more than 64 KiB
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "needs" in e.value.details and "free" in e.value.details
        fits = 65536 // per_token // 2
        with client.session(max_length=fits) as s:  # what fits still works
            assert len(s.generate([1, 2, 3], max_new_tokens=3, stop_token_ids=[], stream=False).token_ids) == 3


def test_session_max_length_is_enforced_by_the_client_and_stages(route):
    with Client(route) as client:
        with client.session(max_length=8) as s:
            out = s.generate([1, 2, 3, 4, 5], max_new_tokens=10, stop_token_ids=[], stream=False)
            assert len(out.token_ids) == 4 and out.finish_reason == "length"  # positions 0..7 used
            with pytest.raises(RPCError) as e:
                s.generate([9, 9], max_new_tokens=1, stream=False)
            assert e.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_route_that_does_not_cover_the_model_is_refused(tiny, route):
    with pytest.raises(RPCError, match="layer"):
        Client(route[:2]).connect()
    with pytest.raises(RPCError, match="not reachable|UNAVAILABLE"):
        Client(["127.0.0.1:1"], config=None).connect()


def test_a_lone_session_of_a_small_model_is_computed_on_the_event_loop(tiny, stage_cluster):
    """A decode step cheaper than --inline-below-ms, with nothing else queued, runs on the stage's event loop; the
    tokens are the same, with --inline-below-ms 0 nothing runs there, and concurrent sessions are still batched on
    the compute thread (the test above). The limit is given (100 s, which any step is below however busy the
    machine): whether a step is that cheap is the machine's business, what the stage does with it is the mechanism
    tested."""
    folder, ref = tiny
    prompt = _prompts(1, seed=5)[0]
    inline_route = stage_cluster(folder, RANGES, "--inline-below-ms", "100000")
    never = stage_cluster(folder, RANGES, "--inline-below-ms", "0")
    for r, inline in ((inline_route, True), (never, False)):
        with Client(r) as client:
            for _ in range(2):  # the first generation measures how long a decode step takes
                before = [i.inline_steps for i in infos(r)]
                out = client.generate(prompt, max_new_tokens=24, stop_token_ids=[], stream=False)
                assert out.token_ids == hf_greedy(ref, prompt, 24)
        ran = [i.inline_steps - b for i, b in zip(infos(r), before, strict=True)]
        if inline:
            assert all(n >= 20 for n in ran), ran  # (after the prompt's step: the decode steps)
        else:
            assert ran == [0, 0, 0], ran


def test_a_one_stage_loop_computes_its_tokens_on_the_event_loop_too(tiny, stage_cluster):
    """A one-stage route's generation loop feeds each token back to the same stage: those steps are computed inline
    as well (they used to take two thread hand-offs each), and give transformers' tokens."""
    folder, ref = tiny
    alone = stage_cluster(folder, [(0, RANGES[-1][1])], "--inline-below-ms", "100000")  # 100 s: any step is below
    prompt = _prompts(1, seed=6)[0]
    with Client(alone) as client:
        for _ in range(2):  # the first generation measures how long a decode step takes
            before = infos(alone)[0].inline_steps
            out = client.generate(prompt, max_new_tokens=24, stop_token_ids=[], stream=False)
            assert out.token_ids == hf_greedy(ref, prompt, 24)
    assert infos(alone)[0].inline_steps - before >= 20
