"""Which gRPC status each of layerline's deliberate errors becomes. Anything else is INTERNAL (and logged): the
message then names the exception type, never a traceback."""

from __future__ import annotations

import grpc

from layerline.errors import (
    AbortedError,
    BadInputError,
    CacheFullError,
    FailedPreconditionError,
    LayerlineError,
    NotFoundError,
    PermissionDeniedError,
    PositionError,
    ResourceExhaustedError,
    UnavailableError,
)

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (CacheFullError, grpc.StatusCode.OUT_OF_RANGE),
    (PositionError, grpc.StatusCode.FAILED_PRECONDITION),
    (BadInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AbortedError, grpc.StatusCode.ABORTED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (LayerlineError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
