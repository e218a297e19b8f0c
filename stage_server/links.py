"""A stage's measurements of its links to other stages, for the coordinator's plans (which weigh each hop's latency
and the bytes of the hidden states over its bandwidth, and choose the chain's order by them).

The coordinator names the other stages in its heartbeat answers; every `interval_s` each one is probed with
Stage.Probe on a channel kept to its address with the options the stage's own Push streams use (gRPC shares the
connection between such channels), so the figures are those of the connection the steps take, measured again and
again while it carries traffic: one large probe to open the connection's window, `small` empty probes (the median
is the round trip) and `large` probes of `large_bytes` (median time less the round trip: the bandwidth). A link's figures are the medians of its last
`keep` rounds. A peer that does not answer keeps its last figures and is tried again next round. Event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from layerline.grpc_setup import channel_options
from layerline.security import Security
from layerline.v1 import coordinator_pb2, stage_pb2, stage_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass
class LinkFigures:
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (round trip, bytes/s), the last `keep`

    @property
    def rtt_s(self) -> float:
        return statistics.median(r for r, _ in self.rounds)

    @property
    def bytes_per_s(self) -> float:
        return statistics.median(b for _, b in self.rounds)


@dataclass
class LinkProber:
    security: Security
    max_message_bytes: int
    interval_s: float = 10.0
    small: int = 5
    large: int = 2
    large_bytes: int = 256 << 10
    keep: int = 3
    timeout_s: float = 10.0
    clock: Callable[[], float] = time.perf_counter
    links: dict[str, LinkFigures] = field(default_factory=dict)  # by peer address
    peers: tuple[str, ...] = ()
    _task: asyncio.Task | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def set_peers(self, addresses: Sequence[str], own: str = "") -> None:
        """The stages to measure (from the coordinator); a new one is measured at once."""
        peers = tuple(sorted(a for a in set(addresses) if a and a != own))
        if peers == self.peers:
            return
        self.peers = peers
        self.links = {a: f for a, f in self.links.items() if a in peers}
        for address in [a for a in self._channels if a not in peers]:
            asyncio.create_task(self._channels.pop(address).close(), name=f"close link channel {address}")
        if any(a not in self.links for a in peers):
            self._wake.set()
        if self._task is None and peers:
            self._task = asyncio.create_task(self._run(), name="measure links")

    def reports(self) -> list[coordinator_pb2.LinkReport]:
        return [
            coordinator_pb2.LinkReport(address=a, rtt_s=f.rtt_s, bytes_per_s=f.bytes_per_s, probes=len(f.rounds))
            for a, f in sorted(self.links.items())
            if f.rounds
        ]

    async def _run(self) -> None:
        while True:
            for address in self.peers:
                try:
                    rtt, bw = await self.measure(address)
                except (grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
                    logger.debug("probing %s: %s", address, e)
                    continue
                if address in self.peers:
                    f = self.links.setdefault(address, LinkFigures())
                    f.rounds = [*f.rounds, (rtt, bw)][-self.keep :]
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)

    async def measure(self, address: str) -> tuple[float, float]:
        """(round trip s, bytes/s) to `address` now."""
        size = max(1, min(self.large_bytes, self.max_message_bytes // 2))
        payload = bytes(size)
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.security.channel(address, channel_options(self.max_message_bytes))
        probe = stage_pb2_grpc.StageStub(channel).Probe

        async def once(data: bytes) -> float:
            t0 = self.clock()
            await probe(stage_pb2.ProbeRequest(payload=data), timeout=self.timeout_s)
            return self.clock() - t0

        await once(payload)  # the connection up and its window open, as a stream carrying steps has it
        rtt = statistics.median([await once(b"") for _ in range(self.small)])
        big = statistics.median([await once(payload) for _ in range(self.large)])
        return rtt, size / max(big - rtt, 1e-6)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()
