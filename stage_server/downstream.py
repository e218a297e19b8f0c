"""The link from one stage to a next stage: one long-lived Push stream per next address, shared by every session
routed there, with an ordered, bounded send queue.

Replies coming back on the stream (a step the next stage rejected) are handed to `on_reply`; when the stream
breaks, every session that had steps on it or waiting for it is reported once through `on_failure` with
UNAVAILABLE, and the next send opens a fresh stream. This module knows nothing of models or of how failures are
routed back to clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from layerline.v1 import stage_pb2, stage_pb2_grpc

logger = logging.getLogger(__name__)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class Downstream:
    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        on_reply: Callable[[stage_pb2.PushReply], None],
        on_failure: Callable[[set[str], str], None],
        queue_size: int = 256,
    ) -> None:
        self.address = address
        self._options = channel_options(max_message_bytes)
        self._on_reply = on_reply
        self._on_failure = on_failure
        self._queue: asyncio.Queue[stage_pb2.Step] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task | None = None
        self._closed = False
        self._sent: set[str] = set()  # next-stage session ids with steps on the current stream

    async def send(self, step: stage_pb2.Step) -> None:
        """Queue a step for the next stage (waits while the queue is full: backpressure)."""
        if self._closed:
            self._on_failure({step.session_id}, f"the link to {self.address} is closed")
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"downstream {self.address}")
        await self._queue.put(step)

    def forget(self, session_id: str) -> None:
        """The session is closed: a later failure of the stream no longer concerns it."""
        self._sent.discard(session_id)

    async def _run(self) -> None:
        self._sent = sent = set()
        error = "stream ended"
        async with grpc.aio.insecure_channel(self.address, options=self._options) as channel:
            call = stage_pb2_grpc.StageStub(channel).Push()
            reader = asyncio.create_task(self._read(call))
            writer = asyncio.create_task(self._write(call, sent))
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, writer):
                if task in done and not task.cancelled() and task.exception() is not None:
                    error = _describe(task.exception())
            for task in (reader, writer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            call.cancel()
        affected = set(sent)
        while not self._queue.empty():
            affected.add(self._queue.get_nowait().session_id)
        if affected and not self._closed:
            logger.warning("link to %s failed (%s); %d session(s) affected", self.address, error, len(affected))
            self._on_failure(affected, f"the next stage at {self.address} is unreachable: {error}")

    async def _write(self, call: grpc.aio.StreamStreamCall, sent: set[str]) -> None:
        while True:
            step = await self._queue.get()
            sent.add(step.session_id)
            await call.write(step)

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        async for reply in call:
            self._on_reply(reply)
        raise ConnectionError("the next stage ended the stream")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
