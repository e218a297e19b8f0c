"""Client SDK: `Client` (sync) and `AsyncClient` (asyncio) stream generated tokens from a route of stage servers.
Every failure is raised as `RPCError` (a gRPC status code and the server's message)."""

from layerline.client.aio import AsyncClient, AsyncSession, ClientConfig, Failover, Generation, Piece, Scores
from layerline.client.errors import RPCError
from layerline.client.sync import Client, Session

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "ClientConfig",
    "Failover",
    "Generation",
    "Piece",
    "RPCError",
    "Scores",
    "Session",
]
