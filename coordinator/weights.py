"""The coordinator as a weight server: stage hosts without the checkpoint fetch their layers' tensors from it.

A request names tensors by their Hugging Face names; only the tensors of this model's layers, embedding, final norm
and LM head can be asked for, in one of the weight formats (`layerline.quant`): a float dtype (GGUF tensors are
dequantized to it), "stored" (a GGUF file's quantized blocks as they are: the bytes on the wire are the file's
share), or "int8" / "int4" (quantized here from the float weights). Each tensor is streamed in chunks of consecutive
bytes, its first chunk naming its type (a float dtype or a GGML block type) and shape; its last chunk carries the
SHA-256 of all its bytes, which the stage checks before it keeps the tensor. One tensor at a time is held in
memory per request; gRPC flow control paces the stream to the receiver.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from layerline.checkpoint import open_checkpoint, read_tensors
from layerline.config import ModelConfig
from layerline.errors import BadInputError, FailedPreconditionError
from layerline.model import expected_tensors
from layerline.quant import from_name
from layerline.quant.tensor import QTensor
from layerline.safetensors_io import raw_bytes
from layerline.v1 import coordinator_pb2
from layerline.weight_cache import sha256_of

DEFAULT_CHUNK = 1 << 20
MIN_CHUNK, MAX_CHUNK = 16 << 10, 2 << 20  # the coordinator's messages stay under its 4 MiB limit
MAX_NAMES = 100_000


def check_request(req: coordinator_pb2.FetchRequest, config: ModelConfig, fingerprint: str) -> tuple[list, int]:
    """The names and chunk size of a valid request; BadInputError / FailedPreconditionError name what is wrong."""
    if req.model_fingerprint != fingerprint:
        raise FailedPreconditionError(
            f"fetch: model fingerprint {req.model_fingerprint or 'none'!r} is not this coordinator's ({fingerprint})"
        )
    try:
        from_name(req.dtype)
    except ValueError as e:
        raise BadInputError(f"fetch: dtype: {e}") from None
    if not req.names:
        raise BadInputError("fetch: no tensor names given")
    if len(req.names) > MAX_NAMES:
        raise BadInputError(f"fetch: {len(req.names)} names is more than {MAX_NAMES}")
    known = expected_tensors(config, 0, config.num_layers)
    unknown = [n for n in req.names if n not in known]
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise BadInputError(f"fetch: {unknown[0][:200]!r}{more} is not a tensor of this model")
    if len(set(req.names)) != len(req.names):
        raise BadInputError("fetch: a tensor is named twice")
    if req.chunk_bytes < 0:
        raise BadInputError(f"fetch: chunk_bytes must not be negative, got {req.chunk_bytes}")
    chunk = min(max(req.chunk_bytes or DEFAULT_CHUNK, MIN_CHUNK), MAX_CHUNK)
    return list(req.names), chunk


async def stream_tensors(model: str, names: list[str], format_name: str, chunk: int) -> AsyncIterator:
    """WeightChunk messages for `names` in the weight format named, read from the checkpoint at `model` (opened
    for this request)."""
    fmt = from_name(format_name)
    ckpt = await asyncio.to_thread(open_checkpoint, model)
    try:
        for name in names:
            t = (await asyncio.to_thread(read_tensors, ckpt, [name], fmt))[name]
            if isinstance(t, QTensor):
                data, type_name = t.data.numpy(), t.type_name
            else:
                t = t.contiguous()
                data, type_name = raw_bytes(t), str(t.dtype).removeprefix("torch.")
            digest = await asyncio.to_thread(sha256_of, t)
            total = data.nbytes
            offset = 0
            while True:
                piece = data[offset : offset + chunk].tobytes()
                msg = coordinator_pb2.WeightChunk(name=name, offset=offset, data=piece)
                if offset == 0:
                    msg.dtype = type_name
                    msg.shape.extend(t.shape)
                    msg.total_bytes = total
                offset += len(piece)
                if offset >= total:
                    msg.sha256 = digest
                yield msg
                if offset >= total:
                    break
            del t, data
    finally:
        ckpt.close()
