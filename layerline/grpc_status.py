"""gRPC status codes: which one each of layerline's deliberate errors becomes (anything else is INTERNAL, and
logged: the message then names the exception type, never a traceback), and a code from its number on the wire
(a Result's `code`)."""

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


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def code_from_int(value: int) -> grpc.StatusCode:
    """The status code a message carries as its number (UNKNOWN for a number gRPC does not define)."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)
