"""What a stage measures for the coordinator's plans: its links to the other stages (stage_server/links.py, over
a real gRPC server whose Probe answers on an injected clock, so the figures are exact whatever the machine's
speed), and the pace of the traffic through a chain's first stage (stage_server/pace.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from layerline.security import Security
from layerline.stage_server.links import LinkProber
from layerline.stage_server.pace import Pace, Track
from layerline.v1 import stage_pb2, stage_pb2_grpc


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowLink(stage_pb2_grpc.StageServicer):
    """A stage whose Probe costs `rtt` plus the payload over `bandwidth`, on the fake clock."""

    def __init__(self, clock: FakeClock, rtt: float, bandwidth: float) -> None:
        self.clock, self.rtt, self.bandwidth, self.calls = clock, rtt, bandwidth, 0

    async def Probe(self, request, context):
        self.calls += 1
        self.clock.now += self.rtt + len(request.payload) / self.bandwidth
        return stage_pb2.ProbeReply(received_bytes=len(request.payload))


async def serve(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_the_prober_measures_round_trip_and_bandwidth_and_follows_the_peer_list():
    async def go() -> None:
        clock = FakeClock()
        fast, slow = SlowLink(clock, 1e-3, 100e6), SlowLink(clock, 20e-3, 1e6)
        (s1, a1), (s2, a2) = await serve(fast), await serve(slow)
        prober = LinkProber(Security(), 4 << 20, interval_s=0.05, small=3, large=2, large_bytes=64 << 10, clock=clock)
        try:
            rtt, bw = await prober.measure(a2)
            assert rtt == pytest.approx(20e-3) and bw == pytest.approx(1e6)
            assert slow.calls == 1 + 3 + 2  # a large probe to open the window, then the measured ones
            prober.set_peers([a1, a2, "127.0.0.1:1"], own="127.0.0.1:1")  # never itself
            assert prober.peers == tuple(sorted([a1, a2]))
            for _ in range(400):
                if all(len(f.rounds) >= 2 for f in prober.links.values()) and len(prober.links) == 2:
                    break
                await asyncio.sleep(0.01)
            reports = {r.address: r for r in prober.reports()}
            assert reports[a1].rtt_s == pytest.approx(1e-3) and reports[a1].bytes_per_s == pytest.approx(100e6)
            assert reports[a2].rtt_s == pytest.approx(20e-3) and reports[a2].probes >= 2
            assert all(len(f.rounds) <= prober.keep for f in prober.links.values())
            prober.set_peers([a1])  # a stage gone from the coordinator: its link is no longer reported
            assert [r.address for r in prober.reports()] == [a1]
            await s2.stop(0)  # a peer that stops answering keeps no new rounds but breaks nothing
            prober.set_peers([a1, a2])
            await asyncio.sleep(0.2)
            assert [r.address for r in prober.reports()] == [a1]
        finally:
            await prober.stop()
            await s1.stop(0)
            await s2.stop(0)

    asyncio.run(asyncio.wait_for(go(), 60))


def step(looped: bool = False, sample: bool = False, loop: bool = False, drafts: int = 0) -> stage_pb2.Step:
    s = stage_pb2.Step(looped=looped, sample=sample, drafts=drafts)
    if loop:
        s.loop.CopyFrom(stage_pb2.Loop(address="x", session_id="y"))
    return s


def test_pace_counts_server_loop_rounds_and_prompts_to_their_first_token():
    pace, t = Pace(), Track()
    pace.note(t, step(), 512, 0.0)  # a prompt in two chunks; the last starts a server loop
    pace.note(t, step(sample=True, loop=True), 100, 0.1)
    pace.note(t, step(looped=True), 1, 0.5)  # its first token back: 612 tokens in 0.5 s
    assert (pace.prefill_tokens, pace.prefill_seconds) == (612, 0.5) and pace.decode_rounds == 0
    for i in range(1, 4):
        pace.note(t, step(looped=True), 1, 0.5 + 0.03 * i)
    assert pace.decode_rounds == 3 and pace.decode_seconds == pytest.approx(0.09)
    pace.note(t, step(looped=True, drafts=3), 4, 0.7)  # a speculative round is not one token's
    assert pace.decode_rounds == 3
    # the client loop (no Loop on the last chunk): its prompt is never closed by a looped step, so not counted
    other = Track()
    pace.note(other, step(sample=True), 10, 1.0)
    pace.note(other, step(sample=True), 1, 1.2)
    assert pace.prefill_tokens == 612
    # a new turn of the first session: its prompt counts from its own first chunk
    pace.note(t, step(sample=True, loop=True), 20, 2.0)
    pace.note(t, step(looped=True), 1, 2.25)
    assert pace.prefill_tokens == 632 and pace.prefill_seconds == pytest.approx(0.75)
    report = pace.report()
    assert (report.decode_rounds, report.prefill_tokens) == (3, 632)
