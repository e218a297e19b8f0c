"""Bad input over the wire: stage servers in subprocesses (tiny llama, 2 stages) fed malformed steps, bad session
requests, oversized and undecodable messages. Every one must be answered with the right gRPC status and a message
that names the problem, a Push stream must stay usable after a rejected step, failures at the second stage must
reach the client on its stream into the first, and a good session running alongside must keep producing exactly
transformers' greedy tokens."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable

import grpc
import pytest
import torch
from stage_wire import (
    KEY,
    TIMEOUT,
    Probe,
    assert_status,
    close_session,
    connect,
    first_step,
    open_chain,
    open_session,
    positions,
    probe,
    rpc_error,
    tokens,
)

from layerline import wire
from layerline.client import AsyncClient
from layerline.v1 import stage_pb2, tensor_pb2
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=4)
RANGES = [(0, 2), (2, 4)]
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]
NEW_TOKENS = 12
TEST_TIMEOUT = 40.0  # seconds one test's event loop may run
FIRST, LAST = "layers 0:2", "layers 2:4"

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint(SPEC)


@pytest.fixture(scope="module")
def route(checkpoint, stage_cluster) -> list[str]:
    return stage_cluster(checkpoint[0], RANGES)


@pytest.fixture(scope="module")
def expected(checkpoint) -> list[int]:
    """The oracle: transformers' greedy continuation of PROMPT."""
    return hf_greedy(checkpoint[1], PROMPT, NEW_TOKENS)


def run(coro: Awaitable) -> None:
    asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


# ---- message builders (see also stage_wire.py) ----------------------------------------------------------------


def hidden(n: int, batch: int = 1, size: int = SPEC.hidden, seed: int = 0) -> tensor_pb2.Tensor:
    g = torch.Generator().manual_seed(seed)
    return wire.encode(torch.randn(batch, n, size, generator=g))


def last_step(session_id: str, n: int, start: int = 0, sample: bool = True, **kw) -> stage_pb2.Step:
    kw.setdefault("client_key", KEY)
    return stage_pb2.Step(session_id=session_id, positions=positions(start, n), hidden=hidden(n), sample=sample, **kw)


async def alongside_good_session(route: list[str], expected: list[int], bad: Awaitable) -> None:
    """Run `bad` while a good session generates over the same stages again and again: every generation must be
    exactly the oracle's. Then generate once more, on a fresh client, after the bad traffic."""
    finished = asyncio.Event()
    runs = 0

    async def generate(client: AsyncClient) -> None:
        out = await asyncio.wait_for(
            client.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_token_ids=[], stream=False), TIMEOUT
        )
        assert out.token_ids == expected

    async def good() -> None:
        nonlocal runs
        async with AsyncClient(route) as client:
            while True:
                await generate(client)
                runs += 1
                if finished.is_set():
                    return

    async def bad_then_finish() -> None:
        try:
            await bad
        finally:
            finished.set()

    await asyncio.gather(good(), bad_then_finish())
    assert runs >= 1
    async with AsyncClient(route) as client:
        await generate(client)


# ---- Push: the first stage ---------------------------------------------------------------------------------------


def test_first_stage_rejects_bad_steps_and_keeps_the_stream(route, checkpoint, expected):
    async def bad() -> None:
        async with connect(route) as stubs:
            ids = await open_chain(stubs, route, max_length=16)
            async with probe(stubs[0], stubs[1], ids[1]) as p:
                sid = ids[0]
                await p.rejected(
                    first_step("no-such-session", PROMPT), NOT_FOUND, FIRST, "no-such-session", "not found"
                )
                no_tokens = stage_pb2.Step(session_id=sid, positions=positions(0, 3), sample=True, client_key=KEY)
                await p.rejected(no_tokens, INVALID, FIRST, "tokens")
                await p.rejected(first_step(sid, [5, SPEC.vocab, 7]), INVALID, FIRST, "token ids", str(SPEC.vocab))
                await p.rejected(first_step(sid, [5, -1, 7]), INVALID, FIRST, "token ids")
                no_positions = stage_pb2.Step(session_id=sid, tokens=tokens([5, 6]), sample=True, client_key=KEY)
                await p.rejected(no_positions, INVALID, FIRST, "positions")
                mismatch = stage_pb2.Step(
                    session_id=sid, positions=positions(0, 3), tokens=tokens([5, 6]), client_key=KEY
                )
                await p.rejected(mismatch, INVALID, FIRST, "tokens", "shape")
                await p.rejected(first_step(sid, PROMPT, start=5), PRECONDITION, FIRST, "position 5", "expected 0")
                await p.rejected(first_step(sid, list(range(20))), OUT_OF_RANGE, FIRST, "max length of 16")
                # the stream still carries steps, and nothing of the rejected ones reached the cache
                oracle = hf_greedy(checkpoint[1], PROMPT, 2)
                assert await p.accepted(first_step(sid, PROMPT)) == oracle[:1]
                assert await p.accepted(first_step(sid, oracle[:1], start=len(PROMPT))) == oracle[1:2]
                assert p.events.empty()
            assert await close_session(stubs[0], ids[0]) and await close_session(stubs[1], ids[1])

    run(alongside_good_session(route, expected, bad()))


# ---- Push: the second stage, steps sent to it directly -----------------------------------------------------------


def test_second_stage_rejects_bad_steps_and_keeps_the_stream(route, expected):
    async def bad() -> None:
        async with connect(route) as stubs:
            sid = await open_session(stubs[1], 8, rows=1)
            async with probe(stubs[1], stubs[1], sid) as p:
                h = SPEC.hidden
                await p.rejected(last_step("no-such-session", 2), NOT_FOUND, LAST, "no-such-session", "not found")
                cases = [
                    # (step fields besides the session id, code, words the message must contain)
                    (dict(positions=positions(0, 2)), INVALID, ["hidden"]),
                    (dict(positions=positions(0, 2), hidden=hidden(2, size=32)), INVALID, ["hidden", str(h), "32"]),
                    (
                        dict(positions=positions(0, 2), hidden=wire.encode(torch.zeros(2, h))),
                        INVALID,
                        ["hidden", "3 dimensions"],
                    ),
                    (
                        dict(positions=positions(0, 2), hidden=wire.encode(torch.zeros(1, 2, h, dtype=torch.int64))),
                        INVALID,
                        ["hidden", "int64"],
                    ),
                    (
                        dict(
                            positions=positions(0, 2),
                            hidden=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[1, 2, h], data=b"\x07" * 100),
                        ),
                        INVALID,
                        ["hidden", "100 bytes", str(2 * h * 4)],
                    ),
                    (
                        dict(
                            positions=positions(0, 2),
                            hidden=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[1, 1 << 40, h], data=b"x" * 64),
                        ),
                        INVALID,
                        ["hidden", str(1 << 40)],
                    ),
                    (
                        dict(positions=positions(0, 2), hidden=tensor_pb2.Tensor(shape=[1, 2, h], data=b"\0" * 8 * h)),
                        INVALID,
                        ["hidden", "dtype"],
                    ),
                    (dict(hidden=hidden(2)), INVALID, ["positions", "missing"]),
                    (
                        dict(positions=wire.encode(torch.zeros(1, 2, dtype=torch.int32)), hidden=hidden(2)),
                        INVALID,
                        ["positions", "int32"],
                    ),
                    (dict(positions=positions(0, 0), hidden=hidden(0)), INVALID, ["positions", "empty"]),
                    (dict(positions=positions(0, 2), hidden=hidden(2), rows=[3]), INVALID, ["rows", "3"]),
                    (dict(positions=positions(0, 2, 2), hidden=hidden(2, 2)), INVALID, ["batch of 2", "rows"]),
                    (dict(positions=positions(0, 2, 2), hidden=hidden(2, 2), rows=[0]), INVALID, ["rows", "batch"]),
                    (dict(positions=positions(5, 2), hidden=hidden(2)), PRECONDITION, ["position 5", "expected 0"]),
                    (dict(positions=positions(0, 10), hidden=hidden(10)), OUT_OF_RANGE, ["max length of 8"]),
                    (dict(positions=positions(0, 2), hidden=hidden(2), truncate=3), INVALID, ["truncate"]),
                ]
                for fields, code, words in cases:
                    await p.rejected(
                        stage_pb2.Step(session_id=sid, sample=True, client_key=KEY, **fields), code, LAST, *words
                    )
                # the same stream still carries steps, and the session's cache starts at position 0
                (first,) = await p.accepted(last_step(sid, 3))
                (second,) = await p.accepted(last_step(sid, 1, start=3))
                assert 0 <= first < SPEC.vocab and 0 <= second < SPEC.vocab
                await p.rejected(last_step(sid, 1, start=3), PRECONDITION, LAST, "position 3", "expected 4")
                assert p.events.empty()
            assert await close_session(stubs[1], sid)

    run(alongside_good_session(route, expected, bad()))


def test_rejected_sampling_settings_leave_the_caches_untouched(route, checkpoint, expected):
    """Bad sampling settings are bad input like any other: the step is refused as a whole, so sending it again with
    good settings continues from where the session was."""
    bad_sampling = stage_pb2.SamplingParams(temperature=-1.0)

    async def bad() -> None:
        async with connect(route) as stubs:
            sid = await open_session(stubs[1], 8, rows=1)
            async with probe(stubs[1], stubs[1], sid) as p:
                await p.rejected(last_step(sid, 2, sampling=bad_sampling), INVALID, LAST, "temperature")
                (token,) = await p.accepted(last_step(sid, 2))
                assert 0 <= token < SPEC.vocab
            assert await close_session(stubs[1], sid)

            ids = await open_chain(stubs, route, max_length=16)
            async with probe(stubs[0], stubs[1], ids[1]) as p:
                seq = await p.send(first_step(ids[0], PROMPT, sampling=bad_sampling))
                kind, reply = await p.next()
                assert kind == "reply" and reply.seq == seq and reply.session_id == ids[0], (kind, reply)
                assert reply.code == INVALID.value[0] and "temperature" in reply.message, reply
                assert await p.accepted(first_step(ids[0], PROMPT)) == expected[:1]
            for stub, sid in zip(stubs, ids, strict=True):
                assert await close_session(stub, sid)

    run(alongside_good_session(route, expected, bad()))


# ---- Push: failures further down the chain come back on the client's stream --------------------------------------


def test_second_stage_failures_are_relayed_to_the_first_stage_stream(route, checkpoint, expected):
    async def bad() -> None:
        async with connect(route) as stubs:
            # the session is gone at the second stage only
            ids = await open_chain(stubs, route, max_length=16)
            async with probe(stubs[0], stubs[1], ids[1]) as p:
                assert await p.accepted(first_step(ids[0], PROMPT)) == expected[:1]  # the subscription is live
                assert await close_session(stubs[1], ids[1])
                kind, _ = await p.next()
                assert kind == "result ended"  # closing ends the subscriber's stream
                step = first_step(ids[0], expected[:1], start=len(PROMPT))
                reply = await p.rejected(step, NOT_FOUND, LAST, ids[1], "not found")
                assert reply.session_id == ids[0]  # the client's id of the session, at the stage it talks to
            assert await close_session(stubs[0], ids[0])

            # a shorter cache at the second stage: the first accepts the step, the second cannot hold it
            ids = await open_chain(stubs, route, max_length=16, last_max_length=4)
            async with probe(stubs[0], stubs[1], ids[1]) as p:
                await p.rejected(first_step(ids[0], PROMPT), OUT_OF_RANGE, LAST, "max length of 4")
            for stub, sid in zip(stubs, ids, strict=True):
                assert await close_session(stub, sid)

            # the next stage cannot be reached at all
            sid = await open_session(stubs[0], 8, next_address="127.0.0.1:1", next_session_id="elsewhere")
            async with probe(stubs[0], stubs[1], "unused") as p:
                await p.send(first_step(sid, PROMPT[:2]))
                kind, reply = await p.next()
                if kind == "result failed":  # the probe's own subscription to no session
                    kind, reply = await p.next()
                assert kind == "reply", (kind, reply)
                assert reply.code == grpc.StatusCode.UNAVAILABLE.value[0] and reply.session_id == sid, reply
                assert "127.0.0.1:1" in reply.message and reply.stage == FIRST, reply
            assert await close_session(stubs[0], sid)

            # and the link between the stages still serves a fresh chain
            ids = await open_chain(stubs, route, max_length=16)
            async with probe(stubs[0], stubs[1], ids[1]) as p:
                assert await p.accepted(first_step(ids[0], PROMPT)) == hf_greedy(checkpoint[1], PROMPT, 1)
            for stub, sid in zip(stubs, ids, strict=True):
                assert await close_session(stub, sid)

    run(alongside_good_session(route, expected, bad()))


# ---- sessions: OpenSession and Subscribe --------------------------------------------------------------------------


def test_open_session_and_subscribe_reject_bad_requests(route, expected):
    async def bad() -> None:
        async with connect(route) as stubs:
            first, last = stubs
            info = await last.Info(stage_pb2.InfoRequest(), timeout=TIMEOUT)
            assert info.max_length == 512

            def Open(**kw) -> stage_pb2.OpenSessionRequest:
                return stage_pb2.OpenSessionRequest(client_key=KEY, **kw)

            cases = [
                (last, Open(max_length=0), INVALID, ["max_length", "0"]),
                (last, Open(max_length=-5), INVALID, ["max_length", "-5"]),
                (last, Open(max_length=513), OUT_OF_RANGE, ["513", "512"]),
                (last, Open(max_length=8, rows=5000), INVALID, ["rows", "5000"]),
                (last, Open(max_length=8, rows=-1), INVALID, ["rows", "-1"]),
                (last, Open(max_length=8, wire_dtype=tensor_pb2.INT64), INVALID, ["wire_dtype"]),
                (last, Open(max_length=8, end_layer=2), grpc.StatusCode.ABORTED, ["out of date", "2:4", "0:2"]),
                (first, Open(max_length=8, next_address=route[1]), INVALID, ["next_session_id"]),
                (first, Open(max_length=8, next_session_id="x"), PRECONDITION, ["next_address"]),
            ]
            for stub, req, code, words in cases:
                assert_status(await rpc_error(stub.OpenSession(req, timeout=TIMEOUT)), code, *words)

            def subscribe(stub, sid: str):
                call = stub.Subscribe(stage_pb2.SubscribeRequest(session_id=sid, client_key=KEY), timeout=TIMEOUT)
                return call, call.read()

            _, read = subscribe(first, "whatever")
            assert_status(await rpc_error(read), PRECONDITION, "not the last stage")
            _, read = subscribe(last, "no-such-session")
            assert_status(await rpc_error(read), NOT_FOUND, "no-such-session")

            sid = await open_session(last, 8)
            async with probe(last, last, sid) as p:
                await p.accepted(last_step(sid, 2))  # the first subscription is live
                _, read = subscribe(last, sid)
                assert_status(await rpc_error(read), PRECONDITION, "subscriber")
                assert await close_session(last, sid)
                assert (await p.next())[0] == "result ended"  # closing ends the first one cleanly
            assert not await close_session(last, sid)

    run(alongside_good_session(route, expected, bad()))


# ---- whole messages that cannot be taken -------------------------------------------------------------------------


def test_undecodable_requests_fail_and_the_stage_keeps_serving(route, expected):
    rng = random.Random(7)
    # a length-delimited field 1 claiming far more bytes than follow: no protobuf parser can accept it
    garbage = [b"\x0a\xff\xff\xff\x7f" + rng.randbytes(40), b"\xff" * 32]
    # grpc's own answer to a request it cannot deserialize (the servicer never sees it); UNKNOWN in grpcio 1.85
    undecodable = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, INVALID}

    async def bad() -> None:
        async with connect(route) as stubs:
            for address in route:
                async with grpc.aio.insecure_channel(address) as channel:
                    open_raw = channel.unary_unary(
                        "/layerline.v1.Stage/OpenSession",
                        request_serializer=lambda b: b,
                        response_deserializer=lambda b: b,
                    )
                    for payload in garbage:
                        e = await rpc_error(open_raw(payload, timeout=TIMEOUT))
                        assert e.code() in undecodable, (e.code(), e.details())
                    push_raw = channel.stream_stream(
                        "/layerline.v1.Stage/Push", request_serializer=lambda b: b, response_deserializer=lambda b: b
                    )
                    call = push_raw(timeout=TIMEOUT)
                    await asyncio.wait_for(call.write(garbage[0]), TIMEOUT)
                    e = await rpc_error(call.read())
                    assert e.code() in undecodable, (e.code(), e.details())
            for stub in stubs:  # still serving
                assert (await stub.Info(stage_pb2.InfoRequest(), timeout=TIMEOUT)).num_layers == SPEC.layers

    run(alongside_good_session(route, expected, bad()))


def test_oversized_step_fails_its_stream_only(checkpoint, stage_cluster, expected):
    route = stage_cluster(checkpoint[0], RANGES, "--max-message-bytes", "1MiB")

    async def bad() -> None:
        async with connect(route) as stubs:
            info = await stubs[0].Info(stage_pb2.InfoRequest(), timeout=TIMEOUT)
            assert info.max_message_bytes == 1 << 20
            ids = await open_chain(stubs, route, max_length=16)
            big = stage_pb2.Step(
                session_id=ids[0],
                client_key=KEY,
                positions=positions(0, 1),
                tokens=tokens([5]),
                hidden=tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[1, 1, 500_000], data=bytes(2_000_000)),
            )
            assert big.ByteSize() > 2 * info.max_message_bytes - 200_000
            async with probe(stubs[0], stubs[1], ids[1]) as p:
                other = stubs[0].Push()  # another stream of the same client is not affected
                await p.send(big)
                kind, e = await p.next()
                assert kind == "reply failed", (kind, e)
                assert_status(e, EXHAUSTED, str(info.max_message_bytes))
                await asyncio.wait_for(other.write(first_step("no-such-session", [5])), TIMEOUT)
                reply = await asyncio.wait_for(other.read(), TIMEOUT)
                assert reply.code == NOT_FOUND.value[0]
                other.cancel()
            for stub, sid in zip(stubs, ids, strict=True):
                assert await close_session(stub, sid)
            # a step that fits still goes through, on a new stream
            ids = await open_chain(stubs, route, max_length=16)
            async with probe(stubs[0], stubs[1], ids[1]) as p:
                assert await p.accepted(first_step(ids[0], PROMPT)) == expected[:1]
            for stub, sid in zip(stubs, ids, strict=True):
                assert await close_session(stub, sid)

    run(alongside_good_session(route, expected, bad()))


def test_kv_budget_refuses_sessions_that_do_not_fit(checkpoint, stage_cluster, expected):
    route = stage_cluster(
        checkpoint[0], RANGES, "--kv-cache-bytes", "200KiB", "--kv-block-size", "0"
    )  # reserved at open

    async def bad() -> None:
        async with connect(route) as stubs:
            last = stubs[1]
            info = await last.Info(stage_pb2.InfoRequest(), timeout=TIMEOUT)
            assert info.kv_bytes_total == 200 << 10 and info.kv_bytes_per_token > 0
            # one session of this length fits the budget, a second one does not
            length = min(info.max_length, info.kv_bytes_total * 2 // 3 // info.kv_bytes_per_token)
            need = length * info.kv_bytes_per_token
            assert need <= info.kv_bytes_total - info.kv_bytes_used < 2 * need
            held = await open_session(last, length)
            e = await rpc_error(
                last.OpenSession(stage_pb2.OpenSessionRequest(max_length=length, client_key=KEY), timeout=TIMEOUT)
            )
            assert_status(e, EXHAUSTED, f"needs {need} bytes", f"of {info.kv_bytes_total} bytes are free")
            # what is free depends on the good session running alongside, but never covers the request
            free = int(re.search(r"only (\d+) of", e.details()).group(1))
            assert 0 <= free <= info.kv_bytes_total - need and free < need
            # rows count too
            rows = info.kv_bytes_total // (8 * info.kv_bytes_per_token) + 1
            e = await rpc_error(
                last.OpenSession(stage_pb2.OpenSessionRequest(max_length=8, rows=rows, client_key=KEY), timeout=TIMEOUT)
            )
            assert_status(e, EXHAUSTED, f"needs {8 * rows * info.kv_bytes_per_token} bytes")
            # a session that fits what is left still opens and works
            small = await open_session(last, 8)
            async with probe(last, last, small) as p:
                (token,) = await p.accepted(last_step(small, 3))
                assert 0 <= token < SPEC.vocab
            assert await close_session(last, small)
            # closing frees the budget at once
            assert await close_session(last, held)
            again = await open_session(last, length)
            assert await close_session(last, again)

    async def all_freed() -> None:
        async with connect(route) as stubs:
            for stub in stubs:
                info = await stub.Info(stage_pb2.InfoRequest(), timeout=TIMEOUT)
                assert info.kv_bytes_used == 0 and info.open_sessions == 0, info

    run(alongside_good_session(route, expected, bad()))
    run(all_freed())


def test_negative_positions_other_than_padding_and_resubscribing(route):
    async def check() -> None:
        async with connect(route) as stubs:
            sid = await open_session(stubs[1], 16, rows=1)
            async with probe(stubs[1], stubs[1], sid) as p:
                bad = last_step(sid, 3)
                bad.positions.CopyFrom(wire.encode(torch.tensor([[0, -7, 1]])))
                await p.rejected(bad, INVALID, "layers 2:4", "only -1")
                padded_last = last_step(sid, 2)
                padded_last.positions.CopyFrom(wire.encode(torch.tensor([[0, -1]])))
                await p.rejected(padded_last, INVALID, "layers 2:4", "last column")
                assert len(await p.accepted(last_step(sid, 2))) == 1
            # the probe's Subscribe stream was cancelled: once the server has noticed, subscribing again works
            # (until then a second subscriber is refused) and results keep coming
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while True:
                p = Probe(stubs[1], stubs[1], sid)
                try:
                    kind, e = await asyncio.wait_for(p.events.get(), 0.3)
                except TimeoutError:
                    break  # the new Subscribe stream is open
                await p.close()
                assert kind == "result failed", (kind, e)
                assert_status(e, PRECONDITION, "already has a subscriber")
                assert asyncio.get_running_loop().time() < deadline, "the old subscriber was never let go"
            try:
                assert len(await p.accepted(last_step(sid, 1, start=2))) == 1
            finally:
                await p.close()
            await close_session(stubs[1], sid)

    run(check())
