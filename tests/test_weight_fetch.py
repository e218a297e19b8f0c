"""Stage hosts without the checkpoint: the model's description and only their own layers' tensors come from the
coordinator (streamed in chunks, each tensor checked against its SHA-256) and are kept in a disk cache.

In process: a coordinator on 127.0.0.1 port 0 over a tiny HF folder and a tiny Q8_0 GGUF file; fetched tensors, in
each weight format (float dtypes, the file's own quantized blocks, int4 made by the coordinator), are bit-identical
to what the stage would read from the checkpoint itself, and the file's blocks cost their share of the file on the
wire; a second fetch reads the cache; a corrupted cached group is fetched again;
bad FetchWeights requests get their statuses; a tampered stream is refused. End to end: two `layerline stage
--coordinator` processes without `--model` (each with a cache of its own) give transformers' tokens and hold only
their own layers' tensors; two stages fetching a GGUF file's blocks give the tokens of the same quantized model in
one process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import grpc
import pytest
import torch

from layerline import weight_cache
from layerline.checkpoint import load_config, open_checkpoint, read_tensors
from layerline.client import Client
from layerline.config import model_fingerprint
from layerline.coordinator.service import start_coordinator
from layerline.errors import CheckpointError
from layerline.local_cluster import LocalCluster, LocalCoordinator
from layerline.model import expected_tensors
from layerline.pipeline import LocalPipeline
from layerline.quant import from_name
from layerline.quant.tensor import Q4_1, Q8_0, QTensor, random_qtensor
from layerline.safetensors_io import raw_bytes
from layerline.stage_server.fetch import TensorReceiver, WeightFetcher, prepare
from layerline.v1 import coordinator_pb2 as pb
from layerline.v1 import coordinator_pb2_grpc
from tiny_models import TinySpec, hf_greedy, write_gguf

SPEC = TinySpec("llama", layers=4, kv_heads=2)
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def gguf_path(tiny_checkpoint, tmp_path_factory):
    _, model = tiny_checkpoint(SPEC)
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")
    write_gguf(model, path, "Q8_0")
    return path


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "stored", "int4"])
def test_fetched_tensors_are_the_checkpoints_and_are_cached(tiny_checkpoint, gguf_path, tmp_path, fmt, weights):
    model = tiny_checkpoint(SPEC)[0] if fmt == "hf" else gguf_path
    config = load_config(model)
    form = from_name(weights)

    async def go() -> None:
        coordinator = await start_coordinator(model, "127.0.0.1", 0)
        try:
            folder, got_form = await prepare(coordinator.address, str(tmp_path), form)
            assert got_form == form
            assert folder.endswith(os.path.join(model_fingerprint(config), weights))
            fetcher = WeightFetcher(coordinator.address, folder, form)
            assert fetcher.fingerprint == model_fingerprint(config) and fetcher.config == config
            await fetcher.ensure(1, 3)  # middle layers only: no embedding, no head
            first = fetcher.bytes_fetched
            assert first > 0 and fetcher.tensors_fetched == len(expected_tensors(config, 1, 3))
            if fmt == "gguf" and weights == "stored":  # the file's own blocks: the bytes are the file's share
                source = open_checkpoint(model)
                assert first == source.stored_bytes(list(expected_tensors(config, 1, 3)))
            assert sorted(os.listdir(folder)) == [
                "layer-00001.safetensors",
                "layer-00002.safetensors",
                "model.json",
                "tokenizer.json",
            ]
            await fetcher.ensure(1, 3)  # all cached: nothing fetched
            assert fetcher.bytes_fetched == first
            await fetcher.ensure(2, 4)  # the last stage: layer 3 and the head come, layer 2 is kept
            assert fetcher.tensors_fetched == len(
                set(expected_tensors(config, 1, 3)) | set(expected_tensors(config, 2, 4))
            )
            # a corrupted cached group is found, dropped and fetched again
            path = os.path.join(folder, "layer-00002.safetensors")
            with open(path, "r+b") as f:
                f.seek(-3, os.SEEK_END)
                byte = f.read(1)
                f.seek(-3, os.SEEK_END)
                f.write(bytes([byte[0] ^ 0xFF]))
            before = fetcher.tensors_fetched
            await fetcher.ensure(2, 4)
            assert fetcher.tensors_fetched - before == len(expected_tensors(config, 2, 3))
        finally:
            await coordinator.stop()
        names = list(expected_tensors(config, 0, config.num_layers))
        fetched = weight_cache.FetchedCheckpoint(folder)
        assert fetched.stored_types() == open_checkpoint(model).stored_types()
        got = read_tensors(fetched, [n for n in names if n in fetched], form)
        want = read_tensors(open_checkpoint(model), list(got), form)
        assert set(got) == set(expected_tensors(config, 1, 3)) | set(expected_tensors(config, 2, 4))
        quantized = 0
        for n, t in got.items():
            if isinstance(t, QTensor):
                quantized += 1
                assert (t.qtype, t.shape) == (want[n].qtype, want[n].shape) and torch.equal(t.data, want[n].data), n
            else:
                assert t.dtype == form.dtype and torch.equal(t, want[n]), n
        # quantized forms hold the matmul weights as blocks (a float checkpoint's "stored" form is float32)
        assert (quantized > 0) == (weights == "int4" or (weights == "stored" and fmt == "gguf"))

    run(go())


def test_bad_fetch_requests_get_statuses(tiny_checkpoint):
    folder, _ = tiny_checkpoint(SPEC)
    fp = model_fingerprint(load_config(folder))
    good_name = "model.layers.0.mlp.up_proj.weight"

    async def go() -> None:
        coordinator = await start_coordinator(folder, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(coordinator.address) as channel:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)

                async def status(**fields) -> tuple[grpc.StatusCode, str]:
                    try:
                        async for _ in stub.FetchWeights(pb.FetchRequest(**fields), timeout=10):
                            pass
                    except grpc.aio.AioRpcError as e:
                        return e.code(), e.details()
                    return grpc.StatusCode.OK, ""

                cases = [
                    (
                        dict(model_fingerprint="0" * 16, names=[good_name], dtype="float32"),
                        "FAILED_PRECONDITION",
                        "fingerprint",
                    ),
                    (dict(model_fingerprint=fp, names=[good_name], dtype="int3"), "INVALID_ARGUMENT", "dtype"),
                    (dict(model_fingerprint=fp, names=[], dtype="float32"), "INVALID_ARGUMENT", "no tensor"),
                    (
                        dict(model_fingerprint=fp, names=["../../etc/passwd"], dtype="float32"),
                        "INVALID_ARGUMENT",
                        "not a tensor",
                    ),
                    (
                        dict(model_fingerprint=fp, names=["model.layers.9.mlp.up_proj.weight"], dtype="float32"),
                        "INVALID_ARGUMENT",
                        "not a tensor",
                    ),
                    (
                        dict(model_fingerprint=fp, names=[good_name, good_name], dtype="float32"),
                        "INVALID_ARGUMENT",
                        "twice",
                    ),
                    (
                        dict(model_fingerprint=fp, names=[good_name], dtype="float32", chunk_bytes=-1),
                        "INVALID_ARGUMENT",
                        "chunk_bytes",
                    ),
                ]
                for fields, code, word in cases:
                    got, details = await status(**fields)
                    assert got.name == code and word in details, (fields, got, details)
                # the coordinator keeps serving: a good request streams the tensor in chunks with its hash
                chunks = [
                    c
                    async for c in stub.FetchWeights(
                        pb.FetchRequest(model_fingerprint=fp, names=[good_name], dtype="float32", chunk_bytes=1),
                        timeout=10,
                    )
                ]
                data = b"".join(c.data for c in chunks)
                assert len(chunks) > 1 and chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
                assert len(data) == chunks[0].total_bytes
                info = await stub.GetModel(pb.ModelRequest(), timeout=10)
                assert info.model_fingerprint == fp and info.num_layers == SPEC.layers and info.tokenizer_json
        finally:
            await coordinator.stop()

    run(go())


def _chunks(name: str, t: torch.Tensor, size: int) -> list[pb.WeightChunk]:
    data = raw_bytes(t).tobytes()
    out = []
    for off in range(0, len(data), size):
        c = pb.WeightChunk(name=name, offset=off, data=data[off : off + size])
        if off == 0:
            c.dtype, c.total_bytes = "float32", len(data)
            c.shape.extend(t.shape)
        out.append(c)
    out[-1].sha256 = hashlib.sha256(data).hexdigest()
    return out


def test_a_tampered_stream_is_refused():
    t = torch.arange(100, dtype=torch.float32).reshape(10, 10)

    def feed(chunks, names=("a",)) -> list:
        r = TensorReceiver(list(names), "float32")
        got = [x for c in chunks if (x := r.take(c)) is not None]
        r.finish()
        return got

    ((name, tensor, _),) = feed(_chunks("a", t, 96))
    assert name == "a" and torch.equal(tensor, t)
    flipped = _chunks("a", t, 96)
    flipped[1].data = bytes([flipped[1].data[0] ^ 1]) + flipped[1].data[1:]
    with pytest.raises(CheckpointError, match="corrupted"):
        feed(flipped)
    swapped = _chunks("a", t, 96)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(CheckpointError, match="offset"):
        feed(swapped)
    with pytest.raises(CheckpointError, match="expected tensor 'a'"):
        feed(_chunks("b", t, 96))
    with pytest.raises(CheckpointError, match="ended after 1 of 2"):
        feed(_chunks("a", t, 96), names=("a", "b"))
    short = _chunks("a", t, 96)
    short[0].total_bytes = 12
    with pytest.raises(CheckpointError, match="do not fit"):
        feed(short)


def test_stages_without_the_checkpoint_fetch_only_their_layers(tiny_checkpoint, tmp_path):
    spec = TinySpec("llama", layers=6, kv_heads=2)
    folder, ref = tiny_checkpoint(spec)
    expected = hf_greedy(ref, PROMPT, 10)
    caches = [tmp_path / "a", tmp_path / "b"]
    prefixes = [["env", f"XDG_CACHE_HOME={c}"] for c in caches]
    with LocalCoordinator(folder, heartbeat=0.5, settle=30, expect=2, objective="throughput") as coordinator:
        # no link probes: the plan changes only with membership, so each stage fetches the one range it gets
        with LocalCluster(
            None,
            [None, None],
            coordinator=coordinator.address,
            threads=1,
            prefixes=prefixes,
            extra_args=["--probe-links", "0"],
        ) as pair:
            deadline = time.monotonic() + 120
            while True:
                with grpc.insecure_channel(coordinator.address) as channel:
                    st = coordinator_pb2_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)
                if len(st.route.addresses) == 2:
                    break
                assert time.monotonic() < deadline, st
                time.sleep(0.2)
            with Client(coordinator=coordinator.address) as client:
                assert client.generate(PROMPT, max_new_tokens=10, stop_token_ids=[], stream=False).token_ids == expected
                assert client.tokenizer() is not None  # served from the fetched description
            fp = model_fingerprint(load_config(folder))
            by_address = {s.report.address: s.assignment for s in st.stages}
            for address, cache in zip(pair.route, caches, strict=True):
                a = by_address[address]
                held = set(os.listdir(os.path.join(cache, "layerline", "weights", fp, "stored")))
                want = {
                    f"{weight_cache.group_of(n)}.safetensors"
                    for n in expected_tensors(load_config(folder), a.start_layer, a.end_layer)
                }
                assert held == want | {"model.json", "tokenizer.json"}, (address, a, held)


def test_a_quantized_stream_must_fit_its_format():
    w = random_qtensor(Q8_0, (4, 64))
    data = w.data.numpy().tobytes()

    def first(dtype: str, shape: list[int], total: int) -> pb.WeightChunk:
        c = pb.WeightChunk(name="a", offset=0, data=data, dtype=dtype, total_bytes=total)
        c.shape.extend(shape)
        c.sha256 = hashlib.sha256(data).hexdigest()
        return c

    name, got, _ = TensorReceiver(["a"], "stored").take(first("Q8_0", [4, 64], len(data)))
    assert isinstance(got, QTensor) and torch.equal(got.data, w.data)
    with pytest.raises(CheckpointError, match="do not fit shape"):
        TensorReceiver(["a"], "stored").take(first("Q8_0", [4, 96], len(data)))
    with pytest.raises(CheckpointError, match="of the int4 format"):  # int4 is Q4_1 blocks (Q8_0 embedding, head)
        TensorReceiver(["a"], "int4").take(first("Q6_K", [4, 64], len(data)))
    with pytest.raises(CheckpointError, match="of the float32 format"):
        TensorReceiver(["a"], "float32").take(first("Q8_0", [4, 64], len(data)))
    with pytest.raises(CheckpointError, match="must be 2-D"):
        TensorReceiver(["a"], "stored").take(first("Q8_0", [256], len(data)))
    assert Q4_1 != Q8_0


def test_stages_fetching_a_gguf_files_blocks_give_its_quantized_tokens(gguf_path, tmp_path):
    expected = list(LocalPipeline.load(gguf_path, [(0, SPEC.layers)]).generate(PROMPT, 10))
    caches = [tmp_path / "a", tmp_path / "b"]
    prefixes = [["env", f"XDG_CACHE_HOME={c}"] for c in caches]
    with LocalCoordinator(gguf_path, heartbeat=0.5, settle=30, expect=2, objective="throughput") as coordinator:
        with LocalCluster(None, [None, None], coordinator=coordinator.address, threads=1, prefixes=prefixes):
            deadline = time.monotonic() + 120
            while True:
                with grpc.insecure_channel(coordinator.address) as channel:
                    st = coordinator_pb2_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)
                if len(st.route.addresses) == 2 and all(s.weight_bytes for s in st.stages):
                    break
                assert time.monotonic() < deadline, st
                time.sleep(0.2)
            with Client(coordinator=coordinator.address) as client:
                assert client.generate(PROMPT, max_new_tokens=10, stop_token_ids=[], stream=False).token_ids == expected
    source = open_checkpoint(gguf_path)
    config = source.config
    for s in st.stages:
        a, b = s.serving_start, s.serving_end
        assert s.report.weights == "stored"
        assert s.weight_bytes == source.stored_bytes(list(expected_tensors(config, a, b))), (a, b)


def test_a_stage_naming_no_weight_format_takes_the_coordinators(gguf_path, tmp_path):
    async def go() -> None:
        coordinator = await start_coordinator(gguf_path, "127.0.0.1", 0, weights=from_name("int8"))
        try:
            folder, form = await prepare(coordinator.address, str(tmp_path), None)
            assert form == from_name("int8") and folder.endswith("int8")
            _, own = await prepare(coordinator.address, str(tmp_path), from_name("float32"))
            assert own == from_name("float32")  # a stage's own --dtype / --quantize wins
        finally:
            await coordinator.stop()

    run(go())
