"""The one exception type the client SDK raises: every failure, remote or local, as a gRPC status code with the
message that explains it (and, where known, which stage said so)."""

from __future__ import annotations

import grpc

from layerline.errors import LayerlineError


class RPCError(LayerlineError):
    """A failed layerline call. `code` is a grpc.StatusCode, `details` the server's (or client's) message."""

    def __init__(self, code: grpc.StatusCode, details: str, stage: str = "") -> None:
        self.code = code
        self.details = details
        self.stage = stage
        where = f" [{stage}]" if stage else ""
        super().__init__(f"{code.name}: {details}{where}")

    @classmethod
    def from_grpc(cls, e: grpc.aio.AioRpcError | grpc.RpcError, where: str = "") -> RPCError:
        code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        return cls(code, details or code.name.lower(), where)
