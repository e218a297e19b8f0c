"""How every layerline process talks gRPC: the channel options of every client, the server options that agree
with them, and one way to start a server (health service, reflection, bind, a loud error for a taken port).

Keepalive: clients ping an idle connection every KEEPALIVE_TIME_MS so that a dead peer is noticed; servers accept
pings down to MIN_PING_INTERVAL_MS apart, with or without calls (a server stricter than its clients answers their
pings with GOAWAY "too_many_pings" and drops the connection). Servers never share a port: gRPC's default
SO_REUSEPORT would let a second stage start on a port a running one holds and take half its connections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from layerline.errors import LayerlineError

if TYPE_CHECKING:
    from layerline.security import Security

KEEPALIVE_TIME_MS = 20_000  # a client pings an idle connection this often
KEEPALIVE_TIMEOUT_MS = 10_000  # and drops it when the answer takes longer
MIN_PING_INTERVAL_MS = 10_000  # a server accepts pings this far apart (below KEEPALIVE_TIME_MS)
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of every client channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of every server: the clients' keepalive accepted, no shared port."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class Served:
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    service_name: str
    port: int

    async def mark_serving(self) -> None:
        """Health says SERVING, for the server as a whole and for its service."""
        for name in ("", self.service_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def serve_grpc(
    add_servicer: Callable[[grpc.aio.Server], None],
    service_name: str,
    host: str,
    port: int,
    *,
    security: Security,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Served:
    """A started server on host:port with the service `add_servicer` adds, the standard health service (SERVING
    once the caller says so: `mark_serving`) and reflection. A port another process holds, or an address this
    machine does not have, raises LayerlineError naming it."""
    server = grpc.aio.server(
        options=server_options(max_message_bytes),
        interceptors=[*interceptors, *security.interceptors()],
    )
    add_servicer(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    bound = security.bind(server, f"{host}:{port}")
    if bound == 0:
        raise LayerlineError(
            f"cannot listen on {host}:{port}: port taken or address not available (pick another --port)"
        )
    await server.start()
    return Served(server, health, service_name, bound)
