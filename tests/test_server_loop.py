"""The generation loop run by the last stage (`Loop` in stage.proto): each sampled token goes straight back to the
first stage, N network hops per token. It must give exactly what the client-driven path and transformers give, end
where the client's rules end a generation, stop promptly on Halt (stop strings, a caller who stops reading) with the
stages' caches left where the client can continue from, and report its failures on the Subscribe stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from stage_wire import KEY, TIMEOUT, assert_status, connect, first_step, open_chain, probe, rpc_error

from layerline.client import AsyncClient, Client, ClientConfig, RPCError
from layerline.v1 import stage_pb2
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=4, kv_heads=2)
SPLITS = {"1": [(0, 4)], "2": [(0, 2), (2, 4)], "3": [(0, 1), (1, 3), (3, 4)]}
TEST_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint(SPEC)


@pytest.fixture(scope="module")
def routes(tiny, stage_cluster) -> dict[str, list[str]]:
    return {name: stage_cluster(tiny[0], ranges) for name, ranges in SPLITS.items()}


def prompt(seed: int, n: int = 11) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


def loop(address: str, first_id: str, max_new_tokens: int, stop: list[int] = ()) -> stage_pb2.Loop:
    return stage_pb2.Loop(
        address=address, session_id=first_id, max_new_tokens=max_new_tokens, stop_token_ids=list(stop)
    )


@pytest.mark.parametrize("stages", list(SPLITS))
def test_server_loop_equals_client_loop_and_transformers(tiny, routes, stages):
    route = routes[stages]
    p = prompt(1)
    sampled = dict(max_new_tokens=14, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=5)
    outs = {}
    for server_loop in (True, False):
        with Client(route, config=ClientConfig(server_loop=server_loop)) as client:
            greedy = client.generate(p, max_new_tokens=20, stop_token_ids=[], stream=False)
            seeded = client.generate(p, stop_token_ids=[], stream=False, **sampled)
            outs[server_loop] = (greedy.token_ids, seeded.token_ids)
    assert outs[True] == outs[False]
    assert outs[True][0] == hf_greedy(tiny[1], p, 20)


def test_stop_token_and_max_length_end_the_loop_where_the_client_stops(tiny, routes):
    route, ref = routes["2"], tiny[1]
    p = prompt(2)
    free = hf_greedy(ref, p, 12)
    with Client(route) as client:
        out = client.generate(p, max_new_tokens=12, stop_token_ids=[free[5]], stream=False)
        assert out.token_ids == free[: free.index(free[5]) + 1] and out.finish_reason == "stop"
        with client.session(max_length=len(p) + 4) as s:
            capped = s.generate(p, max_new_tokens=50, stop_token_ids=[], stream=False)
            assert capped.token_ids == free[:5] and capped.finish_reason == "length"


@pytest.mark.parametrize("stages", ["1", "2"])
def test_stop_string_and_break_halt_the_loop_and_the_session_continues_exactly(tiny, routes, stages):
    route, ref = routes[stages], tiny[1]
    first, second, third = prompt(3), prompt(4, 5), prompt(5, 3)
    with Client(route) as client:
        text = client.generate(first, max_new_tokens=30, stop_token_ids=[], stream=False).text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        with client.session(max_length=256) as s:
            a = s.generate(first, max_new_tokens=200, stop_token_ids=[], stop=[stop], stream=False)
            assert a.finish_reason == "stop" and stop not in a.text and len(a.token_ids) < 30
            pieces = []
            for piece in s.generate(second, max_new_tokens=200, stop_token_ids=[]):
                pieces.append(piece.token_id)
                if len(pieces) == 3:
                    break
            c = s.generate(third, max_new_tokens=6, stop_token_ids=[], stream=False)
            assert s.history == first + a.token_ids + second + pieces + third + c.token_ids
    assert c.token_ids == hf_greedy(ref, first + a.token_ids + second + pieces + third, 6)


def test_halt_ends_a_loop_and_reports_the_cache_length(tiny, routes):
    route, ref = routes["2"], tiny[1]
    p = prompt(6)
    free = hf_greedy(ref, p, 8)

    async def go() -> None:
        async with connect(route) as stubs:
            ids = await open_chain(stubs, route, max_length=500)
            async with probe(stubs[0], stubs[-1], ids[-1]) as pr:
                seq = await pr.send(first_step(ids[0], p, loop=loop(route[0], ids[0], 10_000)))
                got = []
                for _ in range(3):
                    kind, result = await pr.next()
                    assert kind == "result" and result.seq == seq and not result.done, (kind, result)
                    got += list(result.token_ids)
                halted = await stubs[-1].Halt(
                    stage_pb2.HaltRequest(session_id=ids[-1], client_key=KEY), timeout=TIMEOUT
                )
                assert halted.running
                while True:
                    kind, result = await pr.next()
                    assert kind == "result" and result.seq == seq and result.code == 0, (kind, result)
                    got += list(result.token_ids)
                    if result.done:
                        break
                # the loop stopped early (it was good for 10000 tokens, the session for 500 positions), and says what
                # the caches hold: the prompt and every sampled token fed back (the last one sampled maybe not)
                assert 3 <= len(got) < 400, len(got)
                assert got[:20] == hf_greedy(ref, p, 20)[: len(got)]
                (length,) = result.lengths
                assert len(p) + len(got) - 1 <= length <= len(p) + len(got)
                again = await stubs[-1].Halt(stage_pb2.HaltRequest(session_id=ids[-1], client_key=KEY), timeout=TIMEOUT)
                assert not again.running
                # the session goes on from there: roll back to after the third token, feed it, loop for 5
                history = p + free[:3]
                step = first_step(ids[0], [free[2]], start=len(history) - 1, loop=loop(route[0], ids[0], 5))
                step.truncate = len(history) - 1
                seq = await pr.send(step)
                more = []
                while True:
                    kind, result = await pr.next()
                    assert kind == "result" and result.seq == seq, (kind, result)
                    more += list(result.token_ids)
                    if result.done:
                        break
                assert more == hf_greedy(ref, history, 5)
                assert list(result.lengths) == [len(history) + 4]  # max_new_tokens reached: the 5th not fed

    run(go())


def test_bad_loops_are_rejected_and_failures_reach_the_subscriber(tiny, routes):
    route = routes["2"]
    p = prompt(7)
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    async def go() -> None:
        async with connect(route) as stubs:
            ids = await open_chain(stubs, route, max_length=64)
            async with probe(stubs[0], stubs[-1], ids[-1]) as pr:
                await pr.rejected(
                    first_step(ids[0], p, sample=False, loop=loop(route[0], ids[0], 4)),
                    invalid,
                    "layers 0:2",
                    "must sample",
                )
                await pr.rejected(
                    first_step(ids[0], p, loop=loop(route[0], ids[0], 0)), invalid, "layers 0:2", "max_new_tokens"
                )
                await pr.rejected(first_step(ids[0], p, loop=loop("", ids[0], 4)), invalid, "layers 0:2", "address")
                # a loop pointed at a session the first stage does not know: the first token comes, then the loop
                # fails and the subscriber hears why
                seq = await pr.send(first_step(ids[0], p, loop=loop(route[0], "no-such-session", 4)))
                kind, result = await pr.next()
                assert kind == "result" and len(result.token_ids) == 1 and not result.done
                kind, result = await pr.next()
                assert kind == "result" and result.seq == seq and result.done, (kind, result)
                assert result.code == grpc.StatusCode.NOT_FOUND.value[0] and "not found" in result.message
                assert result.stage == "layers 0:2"
            for stub, sid, code in [
                (stubs[-1], "no-such-session", grpc.StatusCode.NOT_FOUND),
                (stubs[0], ids[0], grpc.StatusCode.FAILED_PRECONDITION),
            ]:
                e = await rpc_error(stub.Halt(stage_pb2.HaltRequest(session_id=sid, client_key=KEY), timeout=TIMEOUT))
                assert_status(e, code)

    run(go())


def test_a_loop_to_an_unreachable_first_stage_fails_the_generation(tiny, routes):
    """A client whose idea of the first stage's address the last stage cannot reach gets UNAVAILABLE, not a hang."""
    route = routes["2"]

    async def go() -> None:
        async with connect(route) as stubs:
            ids = await open_chain(stubs, route, max_length=64)
            async with probe(stubs[0], stubs[-1], ids[-1]) as pr:
                await pr.send(first_step(ids[0], prompt(8), loop=loop("127.0.0.1:1", ids[0], 4)))
                kind, result = await pr.next()
                assert kind == "result" and len(result.token_ids) == 1
                kind, result = await pr.next()
                assert kind == "result" and result.done and result.code == grpc.StatusCode.UNAVAILABLE.value[0]
                assert "127.0.0.1:1" in result.message

    run(go())


def test_async_sessions_with_loops_run_concurrently_and_exactly(tiny, routes):
    route, ref = routes["3"], tiny[1]
    prompts = [prompt(20 + i, 4 + 3 * i) for i in range(6)]

    async def go() -> list[list[int]]:
        async with AsyncClient(route) as client:
            outs = await asyncio.gather(
                *(client.generate(q, max_new_tokens=10, stop_token_ids=[], stream=False) for q in prompts)
            )
        return [o.token_ids for o in outs]

    assert run(go()) == [hf_greedy(ref, q, 10) for q in prompts]


def test_rpc_error_from_a_failed_loop_reaches_the_client(tiny, routes):
    """The client sees a loop failure as one RPCError (here: the session closed under it by another party)."""
    route = routes["2"]

    async def go() -> None:
        async with AsyncClient(route) as client:
            async with client.session(max_length=500) as s:
                with pytest.raises(RPCError) as err:
                    n = 0
                    async for _ in s.generate(prompt(9), max_new_tokens=400, stop_token_ids=[]):
                        n += 1
                        if n == 2:  # its client closes the session at the first stage while the loop runs
                            links = await client.links()
                            await links[0].stub.CloseSession(
                                stage_pb2.CloseSessionRequest(session_id=s.ids[0], client_key=client.client_key),
                                timeout=TIMEOUT,
                            )
                assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value

    run(go())
