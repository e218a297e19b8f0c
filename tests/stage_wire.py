"""Raw access to stage servers for tests: wire-message builders, stubs for a route, sessions opened by hand, and a
probe that merges a Push stream's replies with the session's Subscribe stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import grpc
import torch

from layerline import wire
from layerline.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

TIMEOUT = 10.0  # seconds any one await on the network may take
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
KEY = "tests-client-key-0123456789"  # the client key sessions opened by hand are bound to


# ---- message builders --------------------------------------------------------------------------------------------


def positions(start: int, n: int, batch: int = 1) -> tensor_pb2.Tensor:
    return wire.encode(torch.arange(start, start + n, dtype=torch.int64).repeat(batch, 1))


def tokens(ids: list[int], batch: int = 1) -> tensor_pb2.Tensor:
    return wire.encode(torch.tensor([ids] * batch, dtype=torch.int64))


def first_step(session_id: str, ids: list[int], start: int = 0, sample: bool = True, **kw) -> stage_pb2.Step:
    kw.setdefault("client_key", KEY)
    return stage_pb2.Step(
        session_id=session_id, positions=positions(start, len(ids)), tokens=tokens(ids), sample=sample, **kw
    )


# ---- connections -------------------------------------------------------------------------------------------------


def infos(route: list[str]) -> list[stage_pb2.StageInfo]:
    """Each stage's Info, in route order (from synchronous test code)."""

    async def all_infos():
        out = []
        for a in route:
            async with grpc.aio.insecure_channel(a) as ch:
                out.append(await stage_pb2_grpc.StageStub(ch).Info(stage_pb2.InfoRequest(), timeout=10))
        return out

    return asyncio.run(all_infos())


@contextlib.asynccontextmanager
async def connect(route: list[str]):
    """Raw stubs for the stages of a route."""
    channels = [grpc.aio.insecure_channel(a, options=OPTIONS) for a in route]
    try:
        yield [stage_pb2_grpc.StageStub(c) for c in channels]
    finally:
        for c in channels:
            await c.close()


async def open_session(stub: stage_pb2_grpc.StageStub, max_length: int, **kw) -> str:
    kw.setdefault("client_key", KEY)
    req = stage_pb2.OpenSessionRequest(max_length=max_length, **kw)
    return (await stub.OpenSession(req, timeout=TIMEOUT)).session_id


async def open_chain(stubs, route: list[str], max_length: int, last_max_length: int | None = None) -> list[str]:
    """The session on every stage of the route, last stage first (each must know the id at the next)."""
    ids = [await open_session(stubs[-1], last_max_length or max_length, rows=1)]
    for i in reversed(range(len(route) - 1)):
        sid = await open_session(stubs[i], max_length, rows=1, next_address=route[i + 1], next_session_id=ids[0])
        ids.insert(0, sid)
    return ids


async def close_session(stub: stage_pb2_grpc.StageStub, session_id: str, key: str = KEY) -> bool:
    req = stage_pb2.CloseSessionRequest(session_id=session_id, client_key=key)
    return (await stub.CloseSession(req, timeout=TIMEOUT)).closed


async def rpc_error(call: Awaitable) -> grpc.aio.AioRpcError:
    """The status a call fails with (the test fails if it succeeds)."""
    try:
        result = await asyncio.wait_for(call, TIMEOUT)
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError(f"expected the call to fail, it returned {result!r}")


def assert_status(e: grpc.aio.AioRpcError, code: grpc.StatusCode, *words: str) -> None:
    assert e.code() == code, (e.code(), e.details())
    for w in words:
        assert w in (e.details() or ""), (w, e.details())


async def _pump(call, kind: str, events: asyncio.Queue) -> None:
    try:
        async for msg in call:
            events.put_nowait((kind, msg))
        events.put_nowait((f"{kind} ended", None))
    except grpc.aio.AioRpcError as e:
        events.put_nowait((f"{kind} failed", e))


class Probe:
    """A Push stream into one stage and the Subscribe stream of the session at the last stage, their messages merged
    into one queue: ("reply", PushReply), ("result", Result), or "... ended" / "... failed" when a stream stops."""

    def __init__(
        self, push_stub: stage_pb2_grpc.StageStub, last_stub: stage_pb2_grpc.StageStub, last_id: str, key: str = KEY
    ):
        self.events: asyncio.Queue = asyncio.Queue()
        self.push = push_stub.Push()
        self.sub = last_stub.Subscribe(stage_pb2.SubscribeRequest(session_id=last_id, client_key=key))
        self.tasks = [
            asyncio.create_task(_pump(self.push, "reply", self.events)),
            asyncio.create_task(_pump(self.sub, "result", self.events)),
        ]
        self.seq = 0

    async def send(self, step: stage_pb2.Step) -> int:
        self.seq += 1
        step.seq = self.seq
        await asyncio.wait_for(self.push.write(step), TIMEOUT)
        return self.seq

    async def next(self) -> tuple[str, object]:
        return await asyncio.wait_for(self.events.get(), TIMEOUT)

    async def rejected(self, step: stage_pb2.Step, code: grpc.StatusCode, stage: str, *words: str):
        """Send a bad step; its PushReply must come back with `code`, name the stage and contain `words`."""
        seq = await self.send(step)
        kind, reply = await self.next()
        assert kind == "reply", (kind, reply)
        assert reply.seq == seq and reply.session_id == step.session_id, reply
        assert reply.code == code.value[0], (code, reply)
        assert reply.stage == stage, reply
        for w in words:
            assert w in reply.message, (w, reply.message)
        return reply

    async def accepted(self, step: stage_pb2.Step) -> list[int]:
        """Send a good sampling step: its Result comes, and no reply before it."""
        seq = await self.send(step)
        kind, result = await self.next()
        assert kind == "result", (kind, result)
        assert result.seq == seq and list(result.rows) == [0], result
        return list(result.token_ids)

    async def close(self) -> None:
        self.push.cancel()
        self.sub.cancel()
        for t in self.tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


@contextlib.asynccontextmanager
async def probe(push_stub, last_stub, last_id: str, key: str = KEY):
    p = Probe(push_stub, last_stub, last_id, key)
    try:
        yield p
    finally:
        await p.close()
