"""A stage host without the checkpoint: the model's description and its layers' tensors come from the coordinator.

`prepare` asks the coordinator for the model (GetModel) and writes its description into the weight cache
(`layerline/weight_cache.py`); the folder then serves as the stage's checkpoint. Before the stage loads an assigned
range, `WeightFetcher.ensure` checks which of the range's tensors the cache already holds (hashing them) and fetches
only the rest (FetchWeights): each tensor is taken only if its chunks arrive in order, its size matches its dtype and
shape, and the SHA-256 of its bytes is the one the coordinator sent. A broken or bad stream keeps no partial group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import grpc
import torch

from layerline import progress, weight_cache
from layerline.config import config_from_json, model_fingerprint
from layerline.errors import CheckpointError, LayerlineError
from layerline.gguf_dequant import qtype_name
from layerline.grpc_setup import channel_options
from layerline.model import FLOAT_DTYPES, expected_tensors
from layerline.quant import WeightFormat, from_name
from layerline.quant.tensor import Q8_0, QUANTIZE_TO, TYPE_BY_NAME, QTensor, row_bytes
from layerline.security import Security
from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 << 20


async def prepare(
    coordinator: str,
    root: str,
    weights: WeightFormat | None,
    timeout: float = 20.0,
    security: Security | None = None,
) -> tuple[str, WeightFormat]:
    """The weight-cache folder of the coordinator's model (its description written there) and the weight format
    to fetch (`weights`, or None: the coordinator's); raises LayerlineError with a clear message when the
    coordinator cannot be reached or answers nonsense."""
    async with (security or Security()).channel(coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        try:
            info = await stub.GetModel(coordinator_pb2.ModelRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise LayerlineError(
                    f"the coordinator at {coordinator} is unreachable (no answer within {timeout:g} s)"
                ) from None
            raise LayerlineError(
                f"cannot get the model from the coordinator at {coordinator}: {e.code().name}: {e.details()}"
            ) from None
    try:
        config = config_from_json(info.config_json)
    except CheckpointError as e:
        raise LayerlineError(
            f"the coordinator at {coordinator} sent a model config this stage cannot use: {e}"
        ) from None
    if model_fingerprint(config) != info.model_fingerprint:
        raise LayerlineError(
            f"the model config from {coordinator} does not match its fingerprint {info.model_fingerprint} "
            "(different layerline versions?)"
        )
    if weights is None:
        try:
            weights = from_name(info.weights or "stored")
        except ValueError as e:
            raise LayerlineError(
                f"the coordinator at {coordinator} names a weight format this stage lacks: {e}"
            ) from None
    folder = weight_cache.model_folder(root, info.model_fingerprint, weights)
    if info.stored_types_json:
        try:
            types = json.loads(info.stored_types_json)
            if not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values()):
                raise ValueError("not an object of type names")
        except ValueError as e:
            raise LayerlineError(f"the coordinator at {coordinator} sent unreadable tensor types: {e}") from None
    weight_cache.write_model(
        folder, info.name, info.model_fingerprint, info.config_json, info.tokenizer_json, info.stored_types_json
    )
    return folder, weights


class WeightFetcher:
    def __init__(
        self,
        coordinator: str,
        folder: str,
        weights: WeightFormat,
        timeout: float = 600.0,
        security: Security | None = None,
    ) -> None:
        self.coordinator, self.folder, self.weights = coordinator, folder, weights
        self.security = security or Security()
        self.timeout = timeout  # for one fetch call (all the tensors of a range)
        ckpt = weight_cache.FetchedCheckpoint(folder)
        self.config, self.fingerprint = ckpt.config, ckpt.fingerprint
        self.bytes_fetched = 0
        self.tensors_fetched = 0

    async def ensure(self, start: int, end: int) -> None:
        """Every tensor layers [start, end) need is in the cache afterwards (fetched if it was not)."""
        names = list(expected_tensors(self.config, start, end))
        have = await asyncio.to_thread(weight_cache.verified, self.folder, names)
        missing = [n for n in names if n not in have]
        if not missing:
            logger.info("layers %d:%d: all %d tensors already in %s", start, end, len(names), self.folder)
            return
        began, before = time.perf_counter(), self.bytes_fetched
        await self._fetch(missing)
        took = time.perf_counter() - began
        got = self.bytes_fetched - before
        logger.info(
            "layers %d:%d: fetched %d tensors (%.1f MiB) from %s in %.1f s (%.0f MiB/s)",
            start,
            end,
            len(missing),
            got / 2**20,
            self.coordinator,
            took,
            got / 2**20 / max(took, 1e-9),
        )

    async def _fetch(self, names: list[str]) -> None:
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(weight_cache.group_of(n), []).append(n)
        ordered = [n for g in groups.values() for n in g]  # a group's tensors arrive together
        done: dict[str, dict[str, torch.Tensor]] = {g: {} for g in groups}
        hashes: dict[str, str] = {}
        receiver = TensorReceiver(ordered, self.weights.name)
        options = channel_options(MAX_MESSAGE_BYTES)
        shown = progress.bar(len(ordered), f"fetching weights from {self.coordinator}", "tensor")
        async with self.security.channel(self.coordinator, options) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            request = coordinator_pb2.FetchRequest(
                model_fingerprint=self.fingerprint, names=ordered, dtype=self.weights.name
            )
            try:
                async for chunk in stub.FetchWeights(request, timeout=self.timeout):
                    finished = receiver.take(chunk)
                    if finished is None:
                        continue
                    name, tensor, digest = finished
                    self.bytes_fetched += tensor.nbytes
                    self.tensors_fetched += 1
                    shown.update(1)
                    group = weight_cache.group_of(name)
                    done[group][name], hashes[name] = tensor, digest
                    if len(done[group]) == len(groups[group]):
                        await asyncio.to_thread(weight_cache.write_group, self.folder, group, done.pop(group), hashes)
            except grpc.aio.AioRpcError as e:
                raise LayerlineError(
                    f"fetching weights from {self.coordinator} failed: {e.code().name}: {e.details()}"
                ) from None
            finally:
                shown.close()
        receiver.finish()


class TensorReceiver:
    """Checks a FetchWeights stream chunk by chunk and assembles its tensors (`take` returns each finished one).
    Tensors of a float format must come in its dtype; of a quantized format, as blocks of a type that format
    allows (any the kernels compute from for "stored", Q8_0 for "int8", Q4_1 for "int4") or as float32 (norms,
    biases)."""

    def __init__(self, names: list[str], weights: str) -> None:
        self.names, self.weights = names, weights
        fmt = from_name(weights)
        if fmt.kind == "float":
            self.allowed = {weights}
        elif fmt.kind == "stored":
            self.allowed = {*TYPE_BY_NAME, "float32"}
        else:
            self.allowed = {qtype_name(QUANTIZE_TO[fmt.kind]), qtype_name(Q8_0), "float32"}  # Q8_0: embedding, head
        self.index = 0  # the tensor expected next
        self.buf: bytearray | None = None
        self.total = 0
        self.shape: tuple[int, ...] = ()
        self.dtype = ""  # of the tensor being received

    def _size(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        if dtype in FLOAT_DTYPES:
            return math.prod(shape) * FLOAT_DTYPES[dtype].itemsize
        if len(shape) != 2:
            raise CheckpointError(f"fetch: {name}: a {dtype} tensor must be 2-D, got shape {list(shape)}")
        try:
            return shape[0] * row_bytes(TYPE_BY_NAME[dtype], shape[1])
        except CheckpointError as e:
            raise CheckpointError(f"fetch: {name}: {e}") from None

    def take(self, chunk: coordinator_pb2.WeightChunk) -> tuple[str, torch.Tensor | QTensor, str] | None:
        if self.index >= len(self.names):
            raise CheckpointError(f"fetch: the coordinator sent {chunk.name[:100]!r} after every tensor asked for")
        name = self.names[self.index]
        if chunk.name != name:
            raise CheckpointError(f"fetch: expected tensor {name!r}, the coordinator sent {chunk.name[:100]!r}")
        if self.buf is None:  # the tensor's first chunk
            if chunk.offset != 0 or chunk.dtype not in self.allowed:
                raise CheckpointError(
                    f"fetch: {name}: first chunk at offset {chunk.offset} of type {chunk.dtype[:40]!r} "
                    f"(expected offset 0 and a tensor of the {self.weights} format)"
                )
            self.shape = tuple(int(d) for d in chunk.shape)
            if any(d < 0 for d in self.shape):
                raise CheckpointError(f"fetch: {name}: negative shape {list(self.shape)}")
            want = self._size(name, chunk.dtype, self.shape)
            if chunk.total_bytes != want:
                raise CheckpointError(
                    f"fetch: {name}: {chunk.total_bytes} bytes do not fit shape {list(self.shape)} of {chunk.dtype}"
                )
            self.total, self.buf, self.dtype = want, bytearray(), chunk.dtype
        if chunk.offset != len(self.buf):
            raise CheckpointError(f"fetch: {name}: chunk at offset {chunk.offset}, expected {len(self.buf)}")
        if len(self.buf) + len(chunk.data) > self.total:
            raise CheckpointError(f"fetch: {name}: more bytes than its {self.total}")
        self.buf += chunk.data
        if len(self.buf) < self.total:
            if chunk.sha256:
                raise CheckpointError(f"fetch: {name}: checksum sent before all {self.total} bytes")
            return None
        data = self.buf
        self.buf = None
        self.index += 1
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        if self.dtype in FLOAT_DTYPES:
            tensor: torch.Tensor | QTensor = raw.view(FLOAT_DTYPES[self.dtype]).reshape(self.shape)
        else:
            tensor = QTensor.from_raw(TYPE_BY_NAME[self.dtype], self.shape, raw, name=f"fetch: {name}")
        digest = weight_cache.sha256_of(tensor)
        if chunk.sha256 != digest:
            raise CheckpointError(
                f"fetch: {name}: SHA-256 of the received bytes is {digest[:16]}..., the coordinator sent "
                f"{chunk.sha256[:16] or 'none'}...: the transfer was corrupted"
            )
        return name, tensor, digest

    def finish(self) -> None:
        if self.index < len(self.names) or self.buf is not None:
            raise CheckpointError(
                f"fetch: the stream ended after {self.index} of {len(self.names)} tensors "
                f"(next: {self.names[min(self.index, len(self.names) - 1)]!r})"
            )
