"""What the network costs a decoded token, measured side by side in one run: decode tokens/s of SmolLM2 through 1, 2
and 3 stage servers on loopback against one process running the same layerline model with the same torch threads
per process, and the per-hop overhead of the stage protocol against a raw gRPC bidi-stream round trip of the same
payload size. Next to each stage count, the same stages as bare processes in a ring with no layerline server, joined
by OS pipes (the floor that handing tokens between processes sets on this machine) and by raw grpc.aio streams of
bytes (the floor of any pipeline of Python gRPC processes).

Decode rate = (N - 1) / (time to generate N tokens - time to generate 1 token) for the same prompt, on both sides,
so prefill and session set-up are excluded; every time is the median of several repeats after a warm-up.

Per-hop overhead is measured where compute is small, on a tiny random llama with SmolLM2's hidden size (576, so the
same hidden-state payload per hop) and 3 thin layers (head_dim 8, intermediate 64): T_local = seconds per decoded
token in one process, T_k = the same through k stages, with the server loop (k network hops per token: stage k ->
stage 1 -> ... -> stage k; none for one stage) and with the client feeding tokens back (k + 1 hops: client -> stage
1 -> ... -> stage k -> client); overhead per hop = (T_k - T_local) / hops, i.e. all that the servers and the client
add to a token, per hop. The raw round trip is the median round trip of a hidden_size * 4 byte message through a
grpc.aio echo server in another process (one message in flight, identity serializers), measured between the decode
repeats.

    .venv/bin/python bench/decode_overhead.py [--threads 1] [--tokens 64] [--repeats 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import benchlib  # bench/benchlib.py, next to this script
import grpc
import torch
from safetensors.torch import save_file

from layerline.checkpoint import load_config, load_stage
from layerline.client import Client, ClientConfig
from layerline.config import ModelConfig
from layerline.local_cluster import PARENT_ENV, LocalCluster, die_with_parent
from layerline.model import expected_tensors
from layerline.model_source import resolve_model
from layerline.pipeline import LocalPipeline, split_layers

SECTION = "## Decode over gRPC"
ECHO_SERVICE, ECHO_METHOD = "layerline.bench.Echo", "Stream"
ECHO_READY = "ECHO_READY "
TINY = {  # a llama with SmolLM2's hidden size (the same bytes per hop) and almost no compute
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 8,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}

Generate = Callable[[int], list[int]]  # n new tokens -> their ids
T = TypeVar("T")


def machine() -> str:
    return f"{benchlib.machine()}, grpcio {grpc.__version__}"


def elapsed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def seconds_per_token(
    setups: dict[str, Generate], n: int, repeats: int, between: Callable[[], None] = lambda: None
) -> dict[str, tuple[float, list[int]]]:
    """Decode seconds per token of every setup, (median t(n) - median t(1)) / (n - 1), and its n tokens (to compare
    setups). The setups take turns within each repeat, so a change in the machine's load hits them all alike;
    `between` runs once per repeat too."""
    tokens = {}
    for name, generate in setups.items():  # warm-up
        tokens[name] = generate(n)
        if len(tokens[name]) != n:
            raise RuntimeError(f"{name}: asked for {n} tokens, got {len(tokens[name])}")
        generate(1)
    t_n: dict[str, list[float]] = {name: [] for name in setups}
    t_1: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, generate in setups.items():
            t_n[name].append(elapsed(lambda generate=generate: generate(n)))
            t_1[name].append(elapsed(lambda generate=generate: generate(1)))
        between()
    return {
        name: ((statistics.median(t_n[name]) - statistics.median(t_1[name])) / (n - 1), tokens[name]) for name in setups
    }


def local_generate(pipe: LocalPipeline, prompt: list[int]) -> Generate:
    return lambda n: list(pipe.generate(prompt, n))


MODES = {"loop": True, "client": False}  # server loop (N hops per token) / the client feeds tokens back (N + 1)
RINGS = ("bare", "grpc")  # the process ring without layerline: OS pipes / raw gRPC streams between the stages
ALL_MODES = (*RINGS, *MODES)


def hops(stages: int, mode: str) -> int:
    """Hops between processes on a token's critical path (a one-stage ring feeds itself: no hop)."""
    if mode in RINGS or MODES[mode]:
        return stages if stages > 1 else 0
    return stages + 1


def cluster_generate(
    stack: contextlib.ExitStack, model: str, ranges: Sequence[tuple[int, int]], threads: int, prompt: list[int]
) -> dict[str, Generate]:
    """Stage servers for `ranges` and a client per mode on them, all closed with `stack`."""
    cluster = stack.enter_context(LocalCluster(model, ranges, dtype="float32", threads=threads))
    out = {}
    for mode, loop in MODES.items():
        client = stack.enter_context(Client(cluster.route, config=ClientConfig(server_loop=loop)))
        out[mode] = lambda n, client=client: list(
            client.generate(prompt, max_new_tokens=n, stop_token_ids=[], stream=False).token_ids
        )
    return out


def compare(
    model: str,
    num_layers: int,
    stages: Sequence[int],
    threads: int,
    prompt: list[int],
    n: int,
    repeats: int,
    between: Callable[[], None] = lambda: None,
) -> tuple[float, list[tuple[int, str, float, bool]]]:
    """Seconds per token in this process, and (stages, mode, seconds per token, same tokens) through each stage
    count in each mode."""
    with contextlib.ExitStack() as stack:
        setups = {"local": local_generate(LocalPipeline.load(model, [(0, num_layers)], torch.float32), prompt)}
        for k in stages:
            ranges = split_layers(num_layers, stages=k)
            for kind, ring_class in (("bare", BareRing), ("grpc", GrpcRing)):
                ring = ring_class(model, ranges, threads)
                stack.callback(ring.close)
                setups[f"{k} {kind}"] = lambda n, ring=ring: ring.generate(prompt, n)
            for mode, gen in cluster_generate(stack, model, ranges, threads, prompt).items():
                setups[f"{k} {mode}"] = gen
        result = seconds_per_token(setups, n, repeats, between)
    local, ref = result["local"]
    return local, [(k, m, result[f"{k} {m}"][0], result[f"{k} {m}"][1] == ref) for k in stages for m in ALL_MODES]


def label(k: int, mode: str) -> str:
    h = hops(k, mode)
    how = {
        "bare": "bare process ring, OS pipes",
        "grpc": "bare process ring, raw gRPC streams",
        "loop": "layerline, server loop",
        "client": "layerline, client loop",
    }
    return f"{k} stage{'s' if k > 1 else ''}, {how[mode]} ({h} hop{'' if h == 1 else 's'})"


def write_tiny_checkpoint(folder: str) -> ModelConfig:
    """config.json + model.safetensors with random weights scaled so activations stay O(1)."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TINY, f)
    config = ModelConfig.from_hf_dict(TINY)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in expected_tensors(config, 0, config.num_layers).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
        elif "embed_tokens" in name or "lm_head" in name:
            tensors[name] = torch.randn(shape, generator=g)
        else:
            tensors[name] = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return config


# ---- bare process rings: the floor of any multi-process pipeline on this machine ----------------------------------
#
# The same stages in k processes in a ring (stage k-1 feeds its greedy token straight back to stage 0, as layerline's
# server loop does), with nothing else: no validation, no sessions, no queues, no layerline server. Two rings:
#  - OS pipes: what handing a token from process to process (and core to core) costs on this machine, whatever the
#    protocol;
#  - raw gRPC: each stage a grpc.aio server whose bidi stream takes raw bytes (identity serializers, no protobuf),
#    writing to the next stage on a stream it opened, exactly as a stage server does: the floor of any pipeline of
#    Python gRPC processes. A one-stage ring feeds itself in-process (no hop), as layerline's one-stage loop does.
# What layerline loses against a ring is layerline's own cost.

HEADER = struct.Struct("<iii")  # tokens still to generate after this step, first position, tokens in the step
RING_SERVICE = "layerline.bench.Ring"
RING_READY = "RING_READY "


def read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class RingStage:
    """The compute of one ring stage, the same in both rings: layers [start, end) on one greedy sequence."""

    def __init__(self, model: str, start: int, end: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.stage = load_stage(model, start, end, torch.float32)
        self.cache = None

    def payload_bytes(self, count: int) -> int:
        return (8 if self.stage.is_first else 4 * self.stage.config.hidden_size) * count

    def step(self, remaining: int, pos: int, count: int, payload: bytes) -> tuple[bytes | None, int | None]:
        """One step: (the message for the next stage or None, the sampled token at the last stage or None)."""
        stage = self.stage
        if stage.is_first:
            x = torch.frombuffer(bytearray(payload), dtype=torch.int64)[None]
        else:
            x = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(1, count, stage.config.hidden_size)
        if pos == 0:
            self.cache = stage.new_cache(1, 1024)
        positions = torch.arange(pos, pos + count)[None]
        out = stage(x, positions, self.cache, last_only=stage.is_last)
        if not stage.is_last:
            return HEADER.pack(remaining, pos, count) + out.numpy().tobytes(), None
        token = int(out[0, -1].argmax())
        onward = HEADER.pack(remaining - 1, pos + count, 1) + struct.pack("<q", token) if remaining > 1 else None
        return onward, token


def bare_stage(model: str, start: int, end: int, fds: list[int], threads: int) -> None:
    """One stage of the pipe ring (run as `--bare-stage` in its own process): fds = in, out (next stage), result."""
    ring = RingStage(model, start, end, threads)
    fd_in, fd_out, fd_result = fds
    while True:
        try:
            remaining, pos, count = HEADER.unpack(read_exact(fd_in, HEADER.size))
        except EOFError:  # the stage before this one has gone: so does this one
            return
        if count == 0:
            return
        onward, token = ring.step(remaining, pos, count, read_exact(fd_in, ring.payload_bytes(count)))
        if token is not None:
            os.write(fd_result, struct.pack("<q", token))
        if onward is not None:
            os.write(fd_out, onward)


async def grpc_stage(model: str, start: int, end: int, threads: int, fd_result: int) -> None:
    """One stage of the gRPC ring (run as `--grpc-stage`): prints its port, reads the next stage's from stdin. At
    the end every stream is half-closed and the stage waits for its incoming ones to end too, so that nothing is
    cut off (no GOAWAY, no cancelled handler)."""
    ring = RingStage(model, start, end, threads)
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    incoming = 0

    async def push(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        nonlocal incoming
        incoming += 1
        try:
            async for msg in requests:
                inbox.put_nowait(msg)
        finally:
            incoming -= 1
        return
        yield  # an async generator: the stream's replies (none)

    server, port = await serve_bytes(RING_SERVICE, push, RING_READY)
    next_port = int(await asyncio.to_thread(sys.stdin.readline))
    alone = next_port == port  # a one-stage ring feeds itself in-process
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{next_port}")
    call = None if alone else channel.stream_stream(f"/{RING_SERVICE}/{ECHO_METHOD}")()
    try:
        while True:
            msg = await inbox.get()
            remaining, pos, count = HEADER.unpack_from(msg)
            if count == 0:  # the end: passed on to all but the first stage
                if call is not None and not ring.stage.is_last:
                    await call.write(msg)
                return
            onward, token = ring.step(remaining, pos, count, msg[HEADER.size :])
            if token is not None:
                os.write(fd_result, struct.pack("<q", token))
            if onward is not None:
                if call is None:
                    inbox.put_nowait(onward)
                else:
                    await call.write(onward)
    finally:
        if call is not None:
            await call.done_writing()
        for _ in range(500):  # the streams into this stage end once their senders are done (5 s at most)
            if not incoming:
                break
            await asyncio.sleep(0.01)
        await channel.close()
        await server.stop(None)


class Ring:
    """What both rings share: `generate(prompt, n)` feeds the prompt to the first stage (`_feed`) and reads the n
    greedy tokens the last stage writes to `result_r`."""

    result_r: int

    def _feed(self, message: bytes) -> None:
        raise NotImplementedError

    def generate(self, prompt: list[int], n: int) -> list[int]:
        self._feed(HEADER.pack(n, 0, len(prompt)) + struct.pack(f"<{len(prompt)}q", *prompt))
        return [struct.unpack("<q", read_exact(self.result_r, 8))[0] for _ in range(n)]


class BareRing(Ring):
    """k `--bare-stage` processes in a ring of pipes."""

    def __init__(self, model: str, ranges: Sequence[tuple[int, int]], threads: int) -> None:
        k = len(ranges)
        pipes = [os.pipe() for _ in range(k)]  # pipe i feeds stage i
        self.result_r, result_w = os.pipe()
        self.feed = pipes[0][1]
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        self.procs = []
        for i, (a, b) in enumerate(ranges):
            fds = [pipes[i][0], pipes[(i + 1) % k][1], result_w]
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--bare-stage", model, str(a), str(b), str(threads)]
                    + [str(fd) for fd in fds],
                    pass_fds=fds,
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
            )
        for r, w in pipes:
            os.close(r)
            if w != self.feed:
                os.close(w)
        os.close(result_w)

    def _feed(self, message: bytes) -> None:
        os.write(self.feed, message)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.feed, HEADER.pack(0, 0, 0))
        stop(self.procs)
        os.close(self.feed)
        os.close(self.result_r)


class GrpcRing(Ring):
    """k `--grpc-stage` processes in a ring of raw gRPC streams, fed by one stream to the first stage (driven from a
    private event-loop thread, as the sync `Client` drives its calls); tokens come back on a pipe."""

    def __init__(self, model: str, ranges: Sequence[tuple[int, int]], threads: int) -> None:
        self.result_r, result_w = os.pipe()
        # the stages stop one after another, and the C core notes at INFO level each GOAWAY a stage's idle channel
        # gets from the next stage stopping
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid()), "GRPC_VERBOSITY": "ERROR"})
        self.procs: list[subprocess.Popen] = []
        self.driver: StreamDriver | None = None
        try:
            for a, b in ranges:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, os.path.abspath(__file__), "--grpc-stage", model, str(a), str(b)]
                        + [str(threads), str(result_w)],
                        pass_fds=[result_w],
                        env=env,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            ports = [ready_port(p, RING_READY) for p in self.procs]
            for i, p in enumerate(self.procs):
                assert p.stdin is not None
                p.stdin.write(f"{ports[(i + 1) % len(ports)]}\n")
                p.stdin.flush()
            self.driver = StreamDriver(f"127.0.0.1:{ports[0]}", f"/{RING_SERVICE}/{ECHO_METHOD}")
        except BaseException:
            for p in self.procs:  # stages that did start wait for a next port that will not come
                p.kill()
            self.close()
            raise
        finally:
            os.close(result_w)

    def _feed(self, message: bytes) -> None:
        assert self.driver is not None
        self.driver.write(message)

    def close(self) -> None:
        if self.driver is not None:
            with contextlib.suppress(Exception):
                self.driver.write(HEADER.pack(0, 0, 0))
                self.driver.run(self.driver.call.done_writing())
                self.driver.run(asyncio.wait_for(self.driver.call.code(), 10))  # the first stage took the end
            self.driver.close()
            self.driver = None
        stop(self.procs)
        with contextlib.suppress(OSError):
            os.close(self.result_r)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def ready_port(proc: subprocess.Popen, prefix: str) -> int:
    """The port a child process announces with `prefix` on its first line of stdout."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        raise RuntimeError(f"{proc.args[2]} did not start (said {line!r})")
    return int(line[len(prefix) :])


# ---- raw gRPC echo -----------------------------------------------------------------------------------------------


async def serve_bytes(service: str, method: Callable, ready: str) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server on 127.0.0.1 port 0 whose one bidi-stream method (`ECHO_METHOD` of `service`) takes and
    gives raw bytes (no (de)serializers); its port is announced on stdout after `ready`."""
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(method)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {ECHO_METHOD: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{ready}{port}", flush=True)
    return server, port


async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for msg in requests:
        yield msg


async def serve_echo() -> None:
    """The echo server (run as `--echo-server` in its own process): prints its port, serves until killed."""
    die_with_parent()
    server, _ = await serve_bytes(ECHO_SERVICE, _echo, ECHO_READY)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(0)


async def echo_round_trips(call: grpc.aio.StreamStreamCall, size: int, count: int, warmup: int) -> list[float]:
    """Round-trip seconds of `count` messages of `size` bytes, one in flight at a time, on one bidi stream."""
    payload = os.urandom(size)
    times = []
    for i in range(warmup + count):
        t = time.perf_counter()
        await call.write(payload)
        reply = await call.read()
        dt = time.perf_counter() - t
        if len(reply) != size:
            raise RuntimeError(f"the echo returned {len(reply)} bytes for {size}")
        if i >= warmup:
            times.append(dt)
    return times


class StreamDriver:
    """One bidi stream to `address`, driven from a private event-loop thread, the way the sync `Client` drives its
    calls (grpc.aio objects stay on the loop that made them)."""

    def __init__(self, address: str, method: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stream-driver", daemon=True)
        self.thread.start()
        self.channel: grpc.aio.Channel | None = None
        try:
            self.call = self.run(self._open(address, method))
        except BaseException:
            self.close()
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def write(self, message: bytes) -> None:
        self.run(self.call.write(message))

    async def _open(self, address: str, method: str) -> grpc.aio.StreamStreamCall:
        self.channel = grpc.aio.insecure_channel(address)
        return self.channel.stream_stream(method)()

    async def _close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def close(self) -> None:
        self.run(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class EchoServer:
    """`python decode_overhead.py --echo-server` in a child process (which dies with this one), and one bidi stream
    to it (`StreamDriver`)."""

    def __enter__(self) -> EchoServer:
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--echo-server"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.driver: StreamDriver | None = None
        try:
            self.driver = StreamDriver(
                f"127.0.0.1:{ready_port(self.proc, ECHO_READY)}", f"/{ECHO_SERVICE}/{ECHO_METHOD}"
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.driver is not None:
            self.driver.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def round_trips(self, size: int, count: int) -> list[float]:
        assert self.driver is not None
        return self.driver.run(echo_round_trips(self.driver.call, size, count, warmup=max(10, count // 10)))


# ---- report ------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="embedded model name, HF folder or GGUF file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="stage counts to measure")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per timed generation (real model)")
    ap.add_argument("--tiny-tokens", type=int, default=256, help="decode tokens per timed generation (tiny model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--echo-messages", type=int, default=2000, help="raw gRPC round trips, over all repeats")
    ap.add_argument("--out", default=None, help="write (or replace) this benchmark's section in this markdown file")
    ap.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bare-stage", nargs=7, help=argparse.SUPPRESS)  # model start end threads fd_in fd_out fd_result
    ap.add_argument("--grpc-stage", nargs=5, help=argparse.SUPPRESS)  # model start end threads fd_result
    args = ap.parse_args()
    if args.echo_server:
        asyncio.run(serve_echo())
        return
    if args.bare_stage:
        die_with_parent()
        model, *numbers = args.bare_stage
        start, end, threads, *fds = map(int, numbers)
        bare_stage(model, start, end, fds, threads)
        return
    if args.grpc_stage:
        die_with_parent()
        model, *numbers = args.grpc_stage
        start, end, threads, fd_result = map(int, numbers)
        asyncio.run(grpc_stage(model, start, end, threads, fd_result))
        return
    torch.set_num_threads(args.threads)
    n, repeats = args.tokens, args.repeats
    load = os.getloadavg()[0]  # other work on the machine slows the multi-process setups most: say how busy it was

    # 1. decode speed of the real model
    path = resolve_model(args.model)
    config = load_config(path)
    prompt = torch.randint(100, config.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    t_one, speed = compare(path, config.num_layers, args.stages, args.threads, prompt, n, repeats)

    # 2. per-hop overhead on the tiny model, next to a raw gRPC round trip of the same payload
    with tempfile.TemporaryDirectory(prefix="layerline-bench-") as folder, EchoServer() as echo:
        tiny = write_tiny_checkpoint(folder)
        payload = tiny.hidden_size * 4
        rtts: list[float] = []
        tn = args.tiny_tokens
        tiny_prompt = torch.randint(0, tiny.vocab_size, (32,), generator=torch.Generator().manual_seed(1)).tolist()
        count = max(1, args.echo_messages // repeats)
        tiny_local, hop_rows = compare(
            folder,
            tiny.num_layers,
            args.stages,
            args.threads,
            tiny_prompt,
            tn,
            repeats,
            between=lambda: rtts.extend(echo.round_trips(payload, count)),
        )
    rtt = statistics.median(rtts)
    raw_hop = rtt / 2

    lines = [
        f"Decode over gRPC: {os.path.basename(path)}, float32, greedy, batch 1, {args.threads} torch thread(s) in "
        f"every process; stage servers on 127.0.0.1 (`LocalCluster`) driven by the sync `Client`; "
        f"{n} decode tokens after a 32-token prompt, median of {repeats}.",
        f"Machine: {machine()}; 1-minute load average {load:.2f} when the run started.",
        "",
        "| setup | decode tok/s | ms / token | vs one process | vs pipe ring | vs gRPC ring | same tokens |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| one process (`LocalPipeline`) | {1 / t_one:.2f} | {1e3 * t_one:.2f} | 1.00x | - | - | - |",
    ]
    rings = {(k, mode): t for k, mode, t, _ in speed if mode in RINGS}
    for k, mode, t_k, same in speed:
        vs = " | ".join("-" if mode == ring else f"{rings[k, ring] / t_k:.2f}x" for ring in RINGS)
        lines.append(
            f"| {label(k, mode)} | {1 / t_k:.2f} | {1e3 * t_k:.2f} | {t_one / t_k:.2f}x | {vs} "
            f"| {'yes' if same else 'NO'} |"
        )
    lines += [
        "",
        "Target: >= 0.95x one process at 2 stages. Server loop: the last stage feeds each token straight back to the "
        "first (the default); client loop: the client feeds it back (`ClientConfig(server_loop=False)`). Bare "
        "process rings: the same stages in processes, the last feeding its greedy token to the first, nothing else "
        "(no sessions, no checks, no queues, no protobuf), joined by OS pipes (the floor of any multi-process "
        "pipeline on this machine) or by raw grpc.aio bidi streams of bytes, each stage a gRPC server writing to the "
        "next on a stream it opened, as a stage server does (the floor of any pipeline of Python gRPC processes); "
        "'vs gRPC ring' is what layerline itself costs.",
        "",
        f"Per-hop overhead on a tiny random llama (hidden {tiny.hidden_size}, so {payload} bytes of float32 hidden "
        f"state per hop, as SmolLM2; {tiny.num_layers} layers with head_dim {tiny.head_dim}, intermediate "
        f"{tiny.intermediate_size}, vocab {tiny.vocab_size}), {tn} decode tokens, median of {repeats}: overhead per "
        "hop = (T_k - T_local) / hops, i.e. everything the stage servers and the client add to a token (wire, "
        "queues, threads, per-stage fixed costs) spread over the hops between processes on its critical path. Raw "
        f"round trip = the median round trip of a {payload}-byte message on a grpc.aio bidi stream to an echo server "
        f"in another process ({len(rtts)} messages, taken between the decode repeats): {1e6 * rtt:.0f} us; the raw "
        f"one-way hop is half of it, {1e6 * raw_hop:.0f} us.",
        "",
        "| setup | us / token | overhead / token, us | overhead / hop, us | / raw round trip | / raw one-way hop "
        "| over the gRPC ring, us / hop | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| one process | {1e6 * tiny_local:.0f} | - | - | - | - | - | - |",
    ]
    grpc_ring = {k: t for k, mode, t, _ in hop_rows if mode == "grpc"}
    for k, mode, t_k, same in hop_rows:
        over, h = t_k - tiny_local, hops(k, mode)
        per_hop = f"{1e6 * over / h:.0f} | {over / h / rtt:.2f}x | {over / h / raw_hop:.2f}x" if h else "- | - | -"
        own = f"{1e6 * (t_k - grpc_ring[k]) / max(h, 1):.0f}" if mode in MODES else "-"
        lines.append(
            f"| {label(k, mode)} | {1e6 * t_k:.0f} | {1e6 * over:.0f} | {per_hop} | {own} | {'yes' if same else 'NO'} |"
        )
    lines += [
        "",
        "Target: overhead per hop <= 1.5x the raw round trip. The raw round trip is taken with nothing else running; "
        "in a pipeline every hop follows a forward pass, and on this machine a process that has waited for its "
        "input computes slower than one computing back to back, which the rings pay too (their overhead is not "
        "the wire alone). 'Over the gRPC ring' = (T_k - T_gRPC ring) / max(hops, 1): what layerline's server, "
        "protocol and client add per hop to the cheapest pipeline of gRPC processes (a one-stage route: per "
        "token).",
    ]
    benchlib.publish(lines, args.out, SECTION)


if __name__ == "__main__":
    main()
