"""One gRPC set-up for every process: a second server on a port a running one holds fails at start (gRPC would
otherwise share the port), the servers' ping policy accepts the clients' keepalive pings on idle connections (a
stricter server answers them with GOAWAY too_many_pings), and client and server agree on message sizes."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from layerline import grpc_setup
from layerline.coordinator.service import start_coordinator
from layerline.errors import LayerlineError
from layerline.stage_server.config import StageConfig
from layerline.stage_server.running import start_stage
from tiny_models import TinySpec


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _serving(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status


def test_a_second_coordinator_on_a_running_ones_port_fails_and_the_first_keeps_serving(tiny_checkpoint):
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=4))

    async def body():
        first = await start_coordinator(folder, "127.0.0.1", 0)
        try:
            port = int(first.address.rsplit(":", 1)[1])
            with pytest.raises(LayerlineError, match=f"cannot listen on 127.0.0.1:{port}: port taken"):
                await start_coordinator(folder, "127.0.0.1", port)
            assert await _serving(first.address) == health_pb2.HealthCheckResponse.SERVING
        finally:
            await first.stop()

    run(body())


def test_a_second_stage_on_a_running_ones_port_fails_and_the_first_keeps_serving(tiny_checkpoint):
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=4))

    async def body():
        first = await start_stage(StageConfig(model=folder, start=0, end=2))
        try:
            port = int(first.listen.rsplit(":", 1)[1])
            with pytest.raises(LayerlineError, match=f"cannot listen on 127.0.0.1:{port}: port taken"):
                await start_stage(StageConfig(model=folder, start=2, end=4, port=port))
            assert await _serving(first.address) == health_pb2.HealthCheckResponse.SERVING
        finally:
            await first.stop(0)

    run(body())


def test_servers_accept_the_pings_clients_send():
    client = dict(grpc_setup.channel_options())
    server = dict(grpc_setup.server_options())
    assert server["grpc.so_reuseport"] == 0
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    for key in ("grpc.max_send_message_length", "grpc.max_receive_message_length"):
        assert client[key] == server[key] == grpc_setup.DEFAULT_MAX_MESSAGE_BYTES
