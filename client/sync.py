"""The synchronous client: the asyncio client (`aio.py`) driven from a private event-loop thread, with the same
methods returning plain iterators and values. Leaving a `for` loop over a stream early (break, exception,
KeyboardInterrupt) closes the stream at once, which frees an implicit session on every stage."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from layerline.client.aio import AsyncClient, AsyncSession, ClientConfig, Generation, Piece, Scores
from layerline.tokenizer import Tokenizer
from layerline.v1 import stage_pb2

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="layerline-client", daemon=True)
        self.thread.start()
        self.streams: weakref.WeakSet = weakref.WeakSet()  # async generators being iterated from this thread

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop thread and wait for it. If the wait is interrupted (KeyboardInterrupt...), the
        coroutine is cancelled and has finished unwinding (its cleanup awaited) before the interruption goes on -
        also when the interruption comes while the coroutine is being handed to the loop (it then either never
        starts or is cancelled at once)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        finished = threading.Event()
        state: dict[str, Any] = {"task": None, "cancelled": False}

        async def tracked() -> T:
            try:
                return await coro
            finally:
                finished.set()

        def copy(task: asyncio.Task) -> None:
            if task.cancelled():
                done.cancel()
            elif task.exception() is not None:
                done.set_exception(task.exception())
            else:
                done.set_result(task.result())

        def start() -> None:
            if state["cancelled"]:
                coro.close()
                finished.set()
                return
            state["task"] = self.loop.create_task(tracked())
            state["task"].add_done_callback(copy)

        def stop() -> None:  # queued after `start` if that was queued at all (callbacks run in order)
            if state["task"] is None:
                finished.set()
            else:
                state["task"].cancel()

        try:
            self.loop.call_soon_threadsafe(start)
            return done.result()
        except BaseException:
            state["cancelled"] = True
            self.loop.call_soon_threadsafe(stop)
            finished.wait(timeout=30)
            raise

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        self.streams.add(agen)
        try:
            while True:
                try:
                    item = self.run(agen.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
                yield item
        finally:
            self.streams.discard(agen)
            if not self.loop.is_closed():  # else `stop` closed it already
                self.run(agen.aclose())  # type: ignore[attr-defined]

    def deliver(self, result: AsyncIterator[T] | Coroutine[Any, Any, T], stream: bool) -> Iterator[T] | T:
        """What an AsyncClient call returned, driven from this thread: an iterator (stream) or the value."""
        return self.iterate(result) if stream else self.run(result)  # type: ignore[arg-type]

    def close_streams(self) -> None:
        """Close the streams the caller did not finish (an exception or Ctrl-C between two pieces), while the loop
        still runs, so that their sessions are freed on the stages."""
        if self.loop.is_running():
            for agen in list(self.streams):
                self.streams.discard(agen)
                self.run(agen.aclose())  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self.loop.is_running():
            self.close_streams()
            self.run(_cancel_pending())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


async def _cancel_pending() -> None:
    """Cancel what is still running on the loop (e.g. grpc's own bookkeeping tasks) and let it finish."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _make(route: Sequence[str] | str | None, coordinator: str, config: ClientConfig | None) -> AsyncClient:
    return AsyncClient(route, coordinator=coordinator, config=config)


class Client:
    """`Client(route=["host:port", ...])` or `Client(coordinator="host:port")`; use as a context manager or call
    `close()`."""

    def __init__(
        self, route: Sequence[str] | str | None = None, *, coordinator: str = "", config: ClientConfig | None = None
    ) -> None:
        self._loop = _LoopThread()
        try:
            self._aio = self._loop.run(_make(route, coordinator, config))
        except BaseException:
            self._loop.stop()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def route(self) -> list[str]:
        return self._aio.route

    def connect(self) -> list[stage_pb2.StageInfo]:
        """Info of every stage of the route (checked: one model, its layers in order)."""
        return self._loop.run(self._aio.connect())

    def tokenizer(self) -> Tokenizer | None:
        return self._loop.run(self._aio.tokenizer())

    def generate(
        self, prompt: str | Sequence[int], *, stream: bool = True, **options: Any
    ) -> Iterator[Piece] | Generation:
        """A stream of `Piece`s, or with stream=False the whole `Generation` (see AsyncClient.generate)."""
        return self._loop.deliver(self._aio.generate(prompt, stream=stream, **options), stream)

    def chat(
        self, messages: list[dict[str, Any]], *, stream: bool = True, **options: Any
    ) -> Iterator[Piece] | Generation:
        return self._loop.deliver(self._aio.chat(messages, stream=stream, **options), stream)

    def generate_batch(
        self, prompts: Sequence[str | Sequence[int]], *, micro_batch_size: int | None = None, **options: Any
    ) -> list[Generation]:
        """One `Generation` per prompt, in micro-batches pushed back to back (see AsyncClient.generate_batch)."""
        return self._loop.run(self._aio.generate_batch(prompts, micro_batch_size=micro_batch_size, **options))

    def score(
        self, sequences: Sequence[str | Sequence[int]], *, micro_batch_size: int | None = None
    ) -> list[list[float]]:
        """Per-token log-probabilities of each sequence (see AsyncClient.score)."""
        return self._loop.run(self._aio.score(sequences, micro_batch_size=micro_batch_size))

    def score_top(
        self, sequences: Sequence[str | Sequence[int]], top_logprobs: int, *, micro_batch_size: int | None = None
    ) -> list[Scores]:
        """Per-token log-probabilities and the most likely tokens at each position (see AsyncClient.score_top)."""
        return self._loop.run(self._aio.score_top(sequences, top_logprobs, micro_batch_size=micro_batch_size))

    def session(self, max_length: int | None = None) -> Session:
        """`with client.session(max_length=2048) as s:` — several generate/chat calls share one KV cache."""
        return Session(self, self._aio.session(max_length))

    def close(self) -> None:
        if self._loop.loop.is_running():
            self._loop.close_streams()
            self._loop.run(self._aio.close())
        self._loop.stop()


class Session:
    def __init__(self, client: Client, aio: AsyncSession) -> None:
        self._client, self._aio = client, aio

    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def history(self) -> list[int]:
        return self._aio.history

    @property
    def last(self) -> Generation | None:
        return self._aio.last

    @property
    def ids(self) -> list[str]:
        """The session's id on each stage of its chain (first stage first)."""
        return list(self._aio.ids)

    @property
    def drafted(self) -> int:
        """Proposals this session's client loop sent for verification (speculative decoding)."""
        return self._aio.drafted

    @property
    def accepted(self) -> int:
        """Of them, those the last stage accepted."""
        return self._aio.accepted

    def open(self) -> None:
        self._client._loop.run(self._aio.open())

    def close(self) -> None:
        self._client._loop.run(self._aio.close())

    def generate(
        self, prompt: str | Sequence[int], *, stream: bool = True, **options: Any
    ) -> Iterator[Piece] | Generation:
        return self._client._loop.deliver(self._aio.generate(prompt, stream=stream, **options), stream)

    def chat(
        self, messages: list[dict[str, Any]], *, stream: bool = True, **options: Any
    ) -> Iterator[Piece] | Generation:
        return self._client._loop.deliver(self._aio.chat(messages, stream=stream, **options), stream)
