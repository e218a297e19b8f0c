"""The link from one stage to a next stage: one long-lived Push stream per next address, shared by every session
routed there, with an ordered send queue (its length is bounded by the caller, which holds a slot per step until
the step is written).

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

from layerline.grpc_setup import channel_options
from layerline.security import Security
from layerline.v1 import stage_pb2, stage_pb2_grpc

logger = logging.getLogger(__name__)


class Downstream:
    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        on_reply: Callable[[stage_pb2.PushReply], None],
        on_failure: Callable[[set[str], str], None],
        security: Security | None = None,
    ) -> None:
        self.address = address
        self._security = security or Security()
        self._options = channel_options(max_message_bytes)
        self._on_reply = on_reply
        self._on_failure = on_failure
        self._queue: asyncio.Queue[tuple[stage_pb2.Step, Callable[[], None]]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._sent: set[str] = set()  # next-stage session ids with steps on the current stream

    def send(self, step: stage_pb2.Step, on_sent: Callable[[], None]) -> None:
        """Queue a step for the next stage; `on_sent` runs once it is written to the stream (or has failed).
        The caller bounds how many steps are queued (it holds a slot until on_sent)."""
        if self._closed:
            self._on_failure({step.session_id}, f"the link to {self.address} is closed")
            on_sent()
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"downstream {self.address}")
        self._queue.put_nowait((step, on_sent))

    def forget(self, session_id: str) -> None:
        """The session is closed: a later failure of the stream no longer concerns it."""
        self._sent.discard(session_id)

    async def _run(self) -> None:
        self._sent = sent = set()
        error = "stream ended"
        async with self._security.channel(self.address, self._options) as channel:
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
            step, on_sent = self._queue.get_nowait()
            affected.add(step.session_id)
            on_sent()
        if affected and not self._closed:
            logger.warning("link to %s failed (%s); %d session(s) affected", self.address, error, len(affected))
            self._on_failure(affected, f"the next stage at {self.address} is unreachable: {error}")

    async def _write(self, call: grpc.aio.StreamStreamCall, sent: set[str]) -> None:
        while True:
            step, on_sent = await self._queue.get()
            sent.add(step.session_id)
            try:
                await call.write(step)
            finally:
                on_sent()

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
        while not self._queue.empty():
            self._queue.get_nowait()[1]()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
