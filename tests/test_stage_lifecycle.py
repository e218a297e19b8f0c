"""Stage server lifecycle and the CLI around it: health service, clean shutdown on SIGTERM in the middle of a
generation, a clear error for a port in use, and `layerline local` / `layerline generate` end to end (Ctrl-C
included: no stage outlives its launcher)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from layerline.client import Client, RPCError
from layerline.local_cluster import LocalCluster
from layerline.pipeline import LocalPipeline
from layerline.tokenizer import Tokenizer
from tiny_models import TinySpec

SPEC = TinySpec("qwen2", layers=4, kv_heads=2)


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return tiny_checkpoint(SPEC)[0]


def _stage_pids(marker: str) -> list[int]:
    """Processes running `layerline.cli stage` on a model path containing `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
            except OSError:
                continue
            if "layerline.cli\0stage" in cmd and marker in cmd:
                pids.append(int(entry))
    return pids


def test_health_service_reports_serving(folder, stage_cluster):
    route = stage_cluster(folder, [(0, 4)])

    async def check() -> list[int]:
        async with grpc.aio.insecure_channel(route[0]) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return [
                (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)).status
                for name in ("", "layerline.v1.Stage")
            ]

    assert asyncio.run(check()) == [health_pb2.HealthCheckResponse.SERVING] * 2


def test_sigterm_mid_generation_ends_cleanly(folder):
    with LocalCluster(folder, [(0, 2), (2, 4)], threads=1) as cluster:
        outcome: dict[str, object] = {}

        def generate() -> None:
            try:
                with Client(cluster.route) as client:
                    outcome["tokens"] = len(
                        client.generate([1, 2, 3], max_new_tokens=400, stop_token_ids=[], stream=False).token_ids
                    )
            except RPCError as e:
                outcome["error"] = e

        t = threading.Thread(target=generate)
        t.start()
        time.sleep(1.5)
        victim = cluster.processes[1]
        victim.send_signal(signal.SIGTERM)
        assert victim.wait(timeout=20) == 0  # graceful: exit status 0, compute thread joined
        t.join(timeout=60)
        assert not t.is_alive(), "the client hung after the stage stopped"
        # either it finished before the stop, or it failed with a clear status
        if "error" in outcome:
            assert outcome["error"].code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        else:
            assert outcome["tokens"] == 400


def test_port_in_use_is_a_clear_error(folder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "layerline.cli", "stage", "--model", folder, "--layers", "0:4", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_local_json_equals_the_in_process_pipeline(folder):
    before = set(_stage_pids(folder))  # the module's shared clusters
    out = subprocess.run(
        [sys.executable, "-m", "layerline.cli", "local", "--model", folder, "--split", "1,2,1", "--raw", "--json"]
        + ["--max-new-tokens", "12", "hello world"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    tok = Tokenizer.from_path(folder)
    assert got["prompt_token_ids"] == tok.encode("hello world")
    pipe = LocalPipeline.load(folder, [(0, 1), (1, 3), (3, 4)])
    expected = list(pipe.generate(got["prompt_token_ids"], 12, stop_token_ids=tok.eos_token_ids))
    assert got["token_ids"] == expected
    assert got["text"] == tok.decode(expected, skip_special_tokens=True)
    assert set(_stage_pids(folder)) <= before


def test_local_with_stages_is_placed_by_a_coordinator_and_exact(folder, tmp_path):
    """`local --stages N` starts a coordinator that places the stages by their measured capacity."""
    before = set(_stage_pids(folder))
    out = subprocess.run(
        [sys.executable, "-m", "layerline.cli", "--log-level", "INFO", "local", "--model", folder, "--stages", "2"]
        + ["--raw", "--json", "--max-new-tokens", "10", "hello world"],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path)),
    )
    assert out.returncode == 0, out.stderr
    assert "coordinator 127.0.0.1:" in out.stderr and "placed the stages" in out.stderr
    got = json.loads(out.stdout)
    tok = Tokenizer.from_path(folder)
    pipe = LocalPipeline.load(folder, [(0, 4)])
    assert got["token_ids"] == list(pipe.generate(got["prompt_token_ids"], 10, stop_token_ids=tok.eos_token_ids))
    assert os.listdir(tmp_path / "layerline" / "capacity")  # the stages measured themselves and kept the result
    assert set(_stage_pids(folder)) <= before


def test_generate_command_streams_from_a_running_route(folder, stage_cluster):
    route = stage_cluster(folder, [(0, 2), (2, 4)])
    cmd = [sys.executable, "-m", "layerline.cli", "generate", "--route", ",".join(route), "--raw"]
    streamed = subprocess.run(cmd + ["--max-new-tokens", "8", "hello"], capture_output=True, text=True, timeout=120)
    js = subprocess.run(cmd + ["--max-new-tokens", "8", "--json", "hello"], capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0 and js.returncode == 0, streamed.stderr + js.stderr
    assert streamed.stdout == json.loads(js.stdout)["text"] + "\n"
    # speculative decoding from the CLI: the same greedy answer; a bad --speculate-k is a usage error
    spec = cmd + ["--max-new-tokens", "8", "--json", "--speculate", "ngram", "--speculate-k", "3", "hello"]
    fast = subprocess.run(spec, capture_output=True, text=True, timeout=120)
    assert fast.returncode == 0, fast.stderr
    assert json.loads(fast.stdout)["token_ids"] == json.loads(js.stdout)["token_ids"]
    zero = subprocess.run(cmd + ["--speculate-k", "0", "hello"], capture_output=True, text=True, timeout=120)
    assert zero.returncode == 2 and "--speculate-k" in zero.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "layerline.cli", "generate", "--route", route[1], "hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "FAILED_PRECONDITION" in bad.stderr and "Traceback" not in bad.stderr


def test_ctrl_c_on_local_stops_every_stage(folder):
    before = set(_stage_pids(folder))
    p = subprocess.Popen(
        [sys.executable, "-m", "layerline.cli", "local", "--model", folder, "--stages", "2", "--raw"]
        + ["--max-new-tokens", "100000", "hello"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while len(set(_stage_pids(folder)) - before) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(set(_stage_pids(folder)) - before) == 2
    assert p.stdout is not None
    first = os.read(p.stdout.fileno(), 1)  # the answer has begun streaming: interrupt it mid-generation
    assert first
    p.send_signal(signal.SIGINT)
    out, raw = p.communicate(timeout=90)
    err = raw.decode(errors="replace")
    assert "Traceback" not in err, err
    if p.returncode == 0:  # the tiny model's answer (at most 512 positions) was complete before the signal landed
        assert (first + out).endswith(b"\n"), err
    else:
        assert p.returncode == 130 and "layerline: interrupted" in err, err
    deadline = time.monotonic() + 20
    while set(_stage_pids(folder)) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(_stage_pids(folder)) - before


def test_launcher_killed_hard_takes_its_stages_along(folder):
    """Even a SIGKILLed launcher leaves no stage behind (the stages ask the kernel for a signal on its death)."""
    code = (
        "import sys, time\n"
        "from layerline.local_cluster import LocalCluster\n"
        f"c = LocalCluster({folder!r}, [(0, 2), (2, 4)], threads=1)\n"
        "c.start(); print('up', flush=True); time.sleep(600)\n"
    )
    before = set(_stage_pids(folder))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    assert len(set(_stage_pids(folder)) - before) == 2
    p.kill()
    p.wait(timeout=10)
    deadline = time.monotonic() + 20
    while set(_stage_pids(folder)) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(_stage_pids(folder)) - before


def test_local_says_what_it_asked_where_and_that_the_answer_was_cut(folder):
    out = subprocess.run(
        [sys.executable, "-m", "layerline.cli", "local", "--model", folder, "--split", "1,3", "--raw"]
        + ["--max-new-tokens", "3", "hello world"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    head = out.stderr.splitlines()
    assert head[0] == "question: hello world" and "2 stages (as given)" in head[1], out.stderr
    assert head[2].startswith("  stage 1 at 127.0.0.1:") and head[2].endswith("layers 0:1")
    assert head[3].startswith("  stage 2 at 127.0.0.1:") and head[3].endswith("layers 1:4")
    assert head[4] == "answer:"
    tok = Tokenizer.from_path(folder)
    expected = list(
        LocalPipeline.load(folder, [(0, 4)]).generate(tok.encode("hello world"), 3, stop_token_ids=tok.eos_token_ids)
    )
    if len(expected) == 3 and expected[-1] not in tok.eos_token_ids:  # no stop token came first: cut at the limit
        assert "[the answer was cut at 3 tokens: --max-new-tokens 3]" in out.stderr, out.stderr
    else:
        assert "cut" not in out.stderr
