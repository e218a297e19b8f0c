"""Sessions belong to the client that opened them (real stage servers in subprocesses, real gRPC on 127.0.0.1):
another client that learns a session's ids cannot step it, read it, halt it or close it, not even by pointing a
session of its own at it, and the owner's generation goes on with transformers' tokens. OpenSession needs a client
key; a client holds at most --max-sessions-per-client sessions on a stage, and a session at most
--max-session-tokens positions."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from stage_wire import KEY, TIMEOUT, assert_status, connect, first_step, open_session, probe, rpc_error

from layerline import wire
from layerline.client import AsyncClient, RPCError
from layerline.v1 import stage_pb2
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=4)
RANGES = [(0, 2), (2, 4)]
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]
OTHER = "someone-else-entirely-0123"  # another client's key
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint(SPEC)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def test_another_client_cannot_step_read_halt_or_close_a_session(checkpoint, stage_cluster):
    folder, ref = checkpoint
    route = stage_cluster(folder, RANGES)
    first = hf_greedy(ref, PROMPT, 6)
    both = hf_greedy(ref, PROMPT + first + [9, 8], 6)

    async def main() -> None:
        async with AsyncClient(route) as owner, connect(route) as stubs:
            async with owner.session(max_length=64) as s:
                got = await s.generate(PROMPT, max_new_tokens=6, stop_token_ids=[], stream=False)
                assert got.token_ids == first
                head, tail = s.ids
                # the other client knows both ids, but not the owner's key
                async with probe(stubs[0], stubs[1], tail) as p:
                    kind, e = await p.next()  # its Subscribe to the owner's session is refused
                    assert kind == "result failed", (kind, e)
                    assert_status(e, DENIED, "another client")
                    await p.rejected(
                        first_step(head, [5], start=len(PROMPT) + 6, client_key=OTHER), DENIED, "layers 0:2"
                    )
                    await p.rejected(first_step(head, [5], start=len(PROMPT) + 6, client_key=""), DENIED, "layers 0:2")
                halt = stage_pb2.HaltRequest(session_id=tail, client_key=OTHER)
                assert_status(await rpc_error(stubs[1].Halt(halt, timeout=TIMEOUT)), DENIED, "another client")
                for stub, sid in zip(stubs, s.ids, strict=True):
                    close = stage_pb2.CloseSessionRequest(session_id=sid, client_key=OTHER)
                    assert_status(await rpc_error(stub.CloseSession(close, timeout=TIMEOUT)), DENIED, "another client")
                # a session of its own at the first stage, pointed at the owner's session at the second: the steps
                # it passes on carry the other client's key, and the second stage refuses them
                forged = await open_session(stubs[0], 64, next_address=route[1], next_session_id=tail, client_key=OTHER)
                async with probe(stubs[0], stubs[1], tail) as p:
                    await p.next()  # (its Subscribe is refused, as above)
                    await p.rejected(first_step(forged, [1, 2, 3], client_key=OTHER), DENIED, "layers 2:4")
                # a generation loop of its own at the last stage, aimed at the owner's session at the first: the
                # loop's steps carry the other client's key, the first stage refuses them, and the refusal ends the
                # other client's loop, not the owner's session
                own_tail = await open_session(stubs[1], 64, client_key=OTHER)
                async with probe(stubs[1], stubs[1], own_tail, key=OTHER) as p:
                    loop = stage_pb2.Loop(address=route[0], session_id=head, max_new_tokens=5)
                    step = stage_pb2.Step(
                        session_id=own_tail,
                        positions=wire.encode(torch.arange(3)[None]),
                        hidden=wire.encode(torch.randn(1, 3, SPEC.hidden)),
                        sample=True,
                        loop=loop,
                        client_key=OTHER,
                    )
                    await p.send(step)
                    kind, result = await p.next()
                    assert kind == "result" and len(result.token_ids) == 1, (kind, result)  # the first token
                    kind, result = await p.next()
                    assert kind == "result" and result.done and result.code == DENIED.value[0], (kind, result)
                    assert result.stage == "layers 0:2" and "another client" in result.message
                # nothing of that touched the owner's session: it continues from its cache
                infos = [await stub.Info(stage_pb2.InfoRequest(), timeout=TIMEOUT) for stub in stubs]
                assert [i.open_sessions for i in infos] == [2, 2]  # the owner's, and the other client's
                more = await s.generate([9, 8], max_new_tokens=6, stop_token_ids=[], stream=False)
                assert more.token_ids == both

    run(main())


def test_open_session_needs_a_client_key(checkpoint, stage_cluster):
    route = stage_cluster(checkpoint[0], RANGES)

    async def main() -> None:
        async with connect(route) as stubs:
            for key in ("", "short", "x" * 257):
                req = stage_pb2.OpenSessionRequest(max_length=8, client_key=key)
                e = await rpc_error(stubs[1].OpenSession(req, timeout=TIMEOUT))
                assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "client_key", "16 to 256")
            assert await open_session(stubs[1], 8, client_key="k" * 16)
            assert await open_session(stubs[1], 8, client_key="k" * 256)

    run(main())


def test_sessions_per_client_and_positions_per_session_are_limited(checkpoint, stage_cluster):
    folder, ref = checkpoint
    route = stage_cluster(folder, RANGES, "--max-sessions-per-client", "3", "--max-session-tokens", "64")

    async def main() -> None:
        async with connect(route) as stubs:
            held = [await open_session(stubs[1], 16) for _ in range(3)]
            assert len(set(held)) == 3
            req = stage_pb2.OpenSessionRequest(max_length=16, client_key=KEY)
            e = await rpc_error(stubs[1].OpenSession(req, timeout=TIMEOUT))
            assert_status(
                e, grpc.StatusCode.RESOURCE_EXHAUSTED, "already holds 3 sessions", "--max-sessions-per-client"
            )
            assert await open_session(stubs[1], 16, client_key=OTHER)  # another client is not held back by it
            req = stage_pb2.OpenSessionRequest(max_length=40, rows=2, client_key=OTHER)
            e = await rpc_error(stubs[1].OpenSession(req, timeout=TIMEOUT))
            assert_status(e, grpc.StatusCode.RESOURCE_EXHAUSTED, "80 positions", "64", "--max-session-tokens")
            # the SDK's sessions are counted per client too, and the refusal reaches it as an RPCError
            async with AsyncClient(route) as client:
                sessions = [client.session(max_length=16) for _ in range(4)]
                for s in sessions[:3]:
                    await s.open()
                with pytest.raises(RPCError) as err:
                    await sessions[3].open()
                assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-sessions-per-client" in err.value.details
                await sessions[0].close()
                await sessions[3].open()  # one closed: room again
                out = await sessions[3].generate(PROMPT, max_new_tokens=4, stop_token_ids=[], stream=False)
                assert out.token_ids == hf_greedy(ref, PROMPT, 4)
                for s in sessions[1:]:
                    await s.close()

    run(main())
