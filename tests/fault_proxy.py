"""A fault-injecting TCP proxy for tests (netem is not available here): put it in front of a stage and give its
address instead of the stage's. It forwards bytes both ways and can add a one-way delay (with jitter, and the
stalls that lost packets cause a TCP stream), cap the bandwidth, cut every connection (and refuse new ones), or
blackhole them (accept and hold everything, answer nothing). It runs its own asyncio loop in a daemon thread, so
that synchronous tests can drive it.

    with FaultProxy("127.0.0.1:7001", delay=0.02) as p:   # p.address: "127.0.0.1:<port>"
        ...
        p.blackhole()      # from now on nothing gets through, nothing is closed
        p.cut()            # close every connection; new ones are closed at once until p.restore()

As a program it is the delaying relay of a test host's link (tests/netbed.py runs it inside the host's network
namespace, in front of the stage there), and prints "FAULT_PROXY_READY host:port" once it listens:

    python tests/fault_proxy.py --listen 10.213.0.2:7000 --target 127.0.0.1:7001 --delay 0.01 --jitter 0.001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
import time

READY = "FAULT_PROXY_READY "
RETRANSMIT_S = 0.2  # what a lost segment costs a TCP stream: Linux's minimum retransmission timeout


class FaultProxy:
    def __init__(
        self,
        target: str = "",
        delay: float = 0.0,
        bandwidth: float = 0.0,
        *,
        jitter: float = 0.0,
        loss: float = 0.0,
        listen: str = "127.0.0.1:0",
        seed: int = 0,
    ) -> None:
        self.target = target  # host:port; may be set later (before the first connection)
        self.delay = delay  # seconds added to every chunk, each direction (one way)
        self.jitter = jitter  # up to this many seconds more per chunk, at random (the order is kept, as TCP's)
        self.loss = loss  # probability that a chunk stalls as a lost segment would (RETRANSMIT_S more)
        self.bandwidth = bandwidth  # bytes per second per direction and connection; 0 = unlimited
        self.listen = listen
        self._random = random.Random(seed)
        self.holding = False  # blackhole: forward nothing
        self.down = False  # cut: connections closed, new ones refused
        self.connections = 0  # accepted so far
        self.forwarded = 0  # bytes passed on, both directions
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fault-proxy")
        self.address = ""

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        self._thread.start()
        host, port = self.listen.rsplit(":", 1)
        self._server = self._call(asyncio.start_server(self._accept, host, int(port)))
        self.address = f"{host}:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._call(self._close_all(stop=True))
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def blackhole(self, on: bool = True) -> None:
        self.holding = on

    def cut(self) -> None:
        self.down = True
        self._call(self._close_all())

    def restore(self) -> None:
        self.down = self.holding = False

    # ---- inside the proxy's loop ---------------------------------------------------------------------------------

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _close_all(self, stop: bool = False) -> None:
        if stop and self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        self._writers.clear()
        if stop:  # and every connection's tasks, so that the loop stops with nothing pending
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.down or not self.target:
            writer.close()
            return
        host, port = self.target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: chunks leave `delay` seconds after they came, in order, no faster than `bandwidth`."""
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            free_at = 0.0  # when the link is free again (bandwidth)
            while True:
                due, data = await queue.get()
                if data is None:
                    return
                while self.holding:  # blackhole: keep it, say nothing
                    await asyncio.sleep(0.05)
                now = time.monotonic()
                if self.bandwidth > 0:
                    free_at = max(free_at, now) + len(data) / self.bandwidth
                    due = max(due, free_at)
                if due > now:
                    await asyncio.sleep(due - now)
                writer.write(data)
                await writer.drain()
                self.forwarded += len(data)

        sender = asyncio.ensure_future(send())
        try:
            last_due = 0.0
            while data := await reader.read(65536):
                due = time.monotonic() + self.delay
                if self.jitter:
                    due += self._random.uniform(0.0, self.jitter)
                if self.loss and self._random.random() < self.loss:
                    due += RETRANSMIT_S
                last_due = max(last_due, due)  # a stream's bytes arrive in order
                queue.put_nowait((last_due, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, None))
            with contextlib.suppress(BaseException):
                await sender
            with contextlib.suppress(BaseException):
                writer.write_eof()


def main() -> None:
    ap = argparse.ArgumentParser(description="a delaying TCP relay (one test host's link)")
    ap.add_argument("--listen", required=True, help="host:port to listen on")
    ap.add_argument("--target", required=True, help="host:port to forward to")
    ap.add_argument("--delay", type=float, default=0.0, help="one-way seconds added each direction")
    ap.add_argument("--jitter", type=float, default=0.0, help="up to this many seconds more per chunk")
    ap.add_argument("--loss", type=float, default=0.0, help="probability of a lost segment's stall per chunk")
    ap.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s per direction and connection (0: none)")
    a = ap.parse_args()
    proxy = FaultProxy(a.target, a.delay, a.bandwidth, jitter=a.jitter, loss=a.loss, listen=a.listen)
    print(READY + proxy.start(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
