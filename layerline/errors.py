"""The exception types layerline raises on purpose, so callers (and the CLI) can tell user errors from bugs."""

from __future__ import annotations


class LayerlineError(Exception):
    """Base of every error layerline raises deliberately; its message is meant for the user."""


class CheckpointError(LayerlineError):
    """A checkpoint (HF folder or GGUF file) is missing, damaged, or describes something layerline cannot run."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is readable but uses an architecture or option layerline does not implement."""


class BadInputError(LayerlineError, ValueError):
    """Input to a model forward is malformed: wrong shape, dtype, token id or hidden size."""


class PositionError(BadInputError):
    """Positions do not continue a sequence where its cache stopped (a gap, an overlap, a reorder)."""


class CacheFullError(BadInputError):
    """A sequence would grow past the max length its KV cache was allocated for."""


class NotFoundError(LayerlineError):
    """A session (or other named thing) does not exist: never opened, closed, or expired."""


class PermissionDeniedError(LayerlineError):
    """The caller may not do this: e.g. a session opened by another client."""


class AbortedError(LayerlineError):
    """A change under way got in the way; the same request a moment later may succeed (e.g. the stages are loading
    the layers of a new plan)."""


class UnavailableError(LayerlineError):
    """The server cannot do it now but another try (elsewhere, or later) may: e.g. the stage is shutting down."""


class ResourceExhaustedError(LayerlineError):
    """A request does not fit what is left: KV cache budget, queue space, message size."""


class FailedPreconditionError(LayerlineError):
    """A request is well formed but not valid in the current state (e.g. Subscribe on a stage that is not last)."""
