"""The `layerline` command line, run as a user runs it (a subprocess): streaming and JSON output, layer splits,
seeded sampling, and clear errors with exit status 2 for bad arguments."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from layerline.checkpoint import open_checkpoint
from layerline.cli import main
from layerline.model import expected_tensors
from layerline.model_source import resolve_model
from layerline.tokenizer import Tokenizer
from tiny_models import TinySpec


def layerline(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "layerline.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_run_json_on_the_real_model_with_two_splits():
    question = "What is the capital of France?"
    a = layerline("run", "--stages", "3", "--json", "--max-new-tokens", "12", question)
    b = layerline("run", "--split", "4,20,6", "--json", "--max-new-tokens", "12", question)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    out_a, out_b = json.loads(a.stdout), json.loads(b.stdout)
    assert set(out_a) == {"text", "token_ids", "prompt_token_ids"}
    assert out_a["token_ids"] == out_b["token_ids"]
    tok = Tokenizer.from_path(resolve_model("smollm2"))
    assert out_a["prompt_token_ids"] == tok.encode_chat([{"role": "user", "content": question}])
    assert out_a["text"] == tok.decode(out_a["token_ids"], skip_special_tokens=True)
    # the file's quantized weights (the default) answer with 8-bit activations; the exact mode as transformers does
    exact = layerline("run", "--dtype", "float32", "--json", "--max-new-tokens", "12", question)
    assert exact.returncode == 0, exact.stderr
    assert "Paris" in json.loads(exact.stdout)["text"]


def test_run_streams_text_from_a_hf_folder(tiny_checkpoint):
    folder, _ = tiny_checkpoint(TinySpec("qwen2", layers=4))
    out = layerline("run", "--model", folder, "--stages", "2", "--max-new-tokens", "10", "--raw", "hello world")
    assert out.returncode == 0, out.stderr
    streamed = out.stdout
    js = layerline(
        "run", "--model", folder, "--stages", "2", "--max-new-tokens", "10", "--raw", "--json", "hello world"
    )
    assert streamed == json.loads(js.stdout)["text"] + "\n"
    assert len(json.loads(js.stdout)["token_ids"]) == 10


def test_seeded_sampling_repeats(tiny_checkpoint):
    folder, _ = tiny_checkpoint(TinySpec("qwen2", layers=4))
    args = ("run", "--model", folder, "--json", "--raw", "--max-new-tokens", "16", "--temperature", "1.0")
    one = json.loads(layerline(*args, "--seed", "7", "hi").stdout)["token_ids"]
    two = json.loads(layerline(*args, "--seed", "7", "hi").stdout)["token_ids"]
    other = json.loads(layerline(*args, "--seed", "8", "hi").stdout)["token_ids"]
    assert one == two != other


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "--split", "10,10"], "must be positive and sum to the model's 30 layers"),
        (["run", "--stages", "31"], "cannot split 30 layers into 31 stages"),
        (["run", "--split", "a,b"], "--split takes comma-separated layer counts"),
        (
            ["run", "--layers", "10,20"],
            "--layers A:B is one stage's range (layerline stage); give the layers of each "
            "stage as --split, e.g. --split 10,20",
        ),
        (["local", "--layers", "0:12"], "give the layers of each stage as --split, e.g. --split 10,12,8"),
        (["stage", "--layers", "10,20"], "--layers takes a range A:B like 0:15"),
        (["run", "--stages", "0"], "expected a positive integer"),
        (["run", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["run", "--model", "no-such-model"], "model not found: 'no-such-model'"),
        (["local", "--speculate", "no-such-draft"], "speculate must be ngram, stage, smollm2 or a draft model's path"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, words):
    out = layerline(*args, "hi")
    assert out.returncode == 2
    assert words in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # one line, as every error; usage is under --help


def test_stage_flags_and_stage_config_share_their_defaults():
    from dataclasses import fields

    from layerline.cli import build_parser
    from layerline.cli.stage import settings_of
    from layerline.stage_server.config import StageConfig
    from layerline.stage_server.settings import SETTINGS

    parser = build_parser()
    defaults = {f.name: f.default for f in fields(StageConfig)}
    assert settings_of(parser.parse_args(["stage", "--layers", "0:1"])) == {
        s.field: defaults[s.field] for s in SETTINGS
    }
    given = settings_of(
        parser.parse_args(["stage", "--layers", "0:1", "--inline-below-ms", "2.5", "--kv-cache-bytes", "1GiB"])
    )
    assert given["inline_compute_s"] == 0.0025 and given["kv_cache_bytes"] == 1 << 30  # in the fields' units
    text = layerline("stage", "--help").stdout
    assert "(default 600)" in text and "(default 64MiB)" in text and "(default 1)" in text, text


def test_the_wire_dtype_follows_a_16_bit_compute_dtype_unless_given():
    from layerline.cli import build_parser
    from layerline.cli.stage import wire_dtype_of

    parser = build_parser()

    def wire(*flags: str) -> str:
        return wire_dtype_of(parser.parse_args(["stage", "--layers", "0:1", *flags]))

    assert wire() == "float32"  # the file's weights (quantized blocks compute in float32)
    assert wire("--dtype", "bfloat16") == "bfloat16" and wire("--dtype", "float16") == "float16"
    assert wire("--dtype", "float32") == "float32"
    assert wire("--dtype", "bfloat16", "--wire-dtype", "float32") == "float32"


def test_stage_refuses_packed_weights_it_cannot_use(tiny_checkpoint):
    folder, _ = tiny_checkpoint(TinySpec("qwen2", layers=4))
    out = layerline("stage", "--model", folder, "--layers", "0:2", "--pack-weights", "--dtype", "bfloat16")
    assert out.returncode == 2, out.stderr
    assert "--pack-weights: packed weights are for float32 on CPU, not bfloat16" in out.stderr
    assert "Traceback" not in out.stderr


def test_stage_refuses_weight_options_that_do_not_go_together(smollm2_path):
    out = layerline("stage", "--model", smollm2_path, "--layers", "0:2", "--pack-weights")
    assert out.returncode == 2, out.stderr  # the file's Q4_1 blocks: nothing to pack
    assert "--pack-weights is for float weights; this stage's weights are quantized" in out.stderr
    out = layerline("stage", "--layers", "0:2", "--quantize", "int4", "--dtype", "bfloat16")
    assert out.returncode == 2, out.stderr
    assert "quantized weights compute in float32; --dtype bfloat16 cannot go with --quantize int4" in out.stderr
    out = layerline("stage", "--layers", "0:2", "--quantize", "int3")
    assert out.returncode == 2 and "invalid choice: 'int3'" in out.stderr
    assert "Traceback" not in out.stderr


def test_stage_refuses_a_capacity_file_it_cannot_use(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=2))
    out = layerline("stage", "--model", folder, "--layers", "0:2", "--capacity", str(tmp_path / "c.json"))
    assert out.returncode == 2 and "--capacity is what a stage reports to a coordinator" in out.stderr, out.stderr
    # the file is read before the stage starts: nothing listens, nothing registers (no coordinator runs here)
    missing = layerline("stage", "--model", folder, "--coordinator", "127.0.0.1:9", "--capacity", str(tmp_path / "c"))
    assert missing.returncode == 2 and f"--capacity {tmp_path / 'c'}: No such file" in missing.stderr, missing.stderr
    (tmp_path / "bad.json").write_text('{"format": 1, "decode_s_per_layer": 0.001}')
    bad = layerline(
        "stage", "--model", folder, "--coordinator", "127.0.0.1:9", "--capacity", str(tmp_path / "bad.json")
    )
    assert bad.returncode == 2 and "not a capacity entry of format" in bad.stderr, bad.stderr
    assert "Traceback" not in missing.stderr + bad.stderr


def test_info_prints_each_stages_memory_in_every_form(smollm2_path):
    out = layerline("info", "--model", "smollm2", "--split", "12,18")
    assert out.returncode == 0, out.stderr
    assert "num_layers: 30" in out.stdout and "num_kv_heads: 3" in out.stdout
    assert "tensor types: Q4_1 210, F32 61, Q8_0 1" in out.stdout
    rows = {
        line.split()[1]: line.split()[2:]
        for line in out.stdout.splitlines()
        if line.startswith("  0 ") or line.startswith("  1 ")
    }
    ckpt = open_checkpoint(smollm2_path)
    for span, (a, b) in (("0:12", (0, 12)), ("12:30", (12, 30))):
        stored, float32, bf16, int8, int4 = (float(v) for v in rows[span])
        assert stored == round(ckpt.stored_bytes(list(expected_tensors(ckpt.config, a, b))) / 2**20, 1)
        assert float32 > 4 * stored and bf16 == pytest.approx(float32 / 2, abs=0.2) and stored < int8
        assert int4 == stored  # the file's own form: Q4_1 layers, a Q8_0 embedding


def test_run_quantizes_a_float_checkpoint_at_load(tiny_checkpoint):
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=2, hidden=64, intermediate=128))
    runs = {"float32": (), "Q8_0": ("--quantize", "int8"), "Q4_1": ("--quantize", "int4")}
    for held, extra in runs.items():
        out = layerline(
            "--log-level", "INFO", "run", "--model", folder, "--raw", "--json", "--max-new-tokens", "6", *extra, "hi"
        )
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["token_ids"]) == 6
        line = next(line for line in out.stderr.splitlines() if "MiB of weights (" in line)
        assert held in line and ("quantized: " in line) == (held != "float32"), line


def test_coordinator_status_and_plan_commands(tiny_checkpoint, capsys, tmp_path, monkeypatch):
    """`layerline coordinator` in a subprocess; two stages register by hand; `status` and `plan` describe them; a
    coordinator that is not there is a one-line error; SIGTERM stops it cleanly."""
    import grpc

    from layerline.checkpoint import load_config
    from layerline.config import model_fingerprint
    from layerline.v1 import coordinator_pb2 as pb
    from layerline.v1 import coordinator_pb2_grpc

    folder, _ = tiny_checkpoint(TinySpec("llama", layers=4))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "layerline.cli",
            "coordinator",
            "--model",
            folder,
            "--port",
            "0",
            "--settle",
            "0",
            "--objective",
            "throughput",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        address = line.strip().rsplit(" ", 1)[-1]
        fp = model_fingerprint(load_config(folder))
        with grpc.insecure_channel(address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            for port, per_layer in ((7001, 1e-3), (7002, 3e-3)):
                report = pb.StageReport(
                    address=f"127.0.0.1:{port}",
                    model_fingerprint=fp,
                    device="cpu",
                    dtype="float32",
                    decode_s_per_layer=per_layer,
                    memory_bytes=1 << 30,
                    bytes_per_param=4,
                    device_name="CPU: Test" if port == 7001 else "NVIDIA Test GPU",
                    kv_bytes=64 << 20,
                    kv_block_size=16,
                    kv_bytes_per_layer_position=512,
                )
                got = stub.Register(pb.RegisterRequest(stage=report), timeout=10)
            # the second stage says what it holds on its device: status shows it of the device's total
            beat = pb.HeartbeatRequest(
                stage_id=got.stage_id,
                device_memory_used=300 << 20,
                device_memory_total=24 << 30,
                kv_blocks_total=200,
                kv_blocks_used=12,
                kv_blocks_cached=30,
            )
            stub.Heartbeat(beat, timeout=10)
        assert main(["plan", "--coordinator", address]) == 0
        out = capsys.readouterr().out
        assert "127.0.0.1:7001: layers 0:3 (3)" in out and "127.0.0.1:7002: layers 3:4 (1)" in out
        # each stage's KV budget in blocks of its layers: 64 MiB / (3 layers x 512 bytes x 16) = 2730, less one
        assert "KV for 43664 positions (2729 blocks of 16)" in out, out
        assert main(["status", "--coordinator", address]) == 0
        out = capsys.readouterr().out
        assert "127.0.0.1:7001" in out and "loading" in out and "predicted bottleneck" in out
        assert "NVIDIA Test GPU" in out and "300 MiB of 24.0 GiB" in out, out
        assert "(12/200 blocks, 30 cached)" in out, out
        # a terminal of 80 columns: one block of short lines per stage, every figure still there
        for columns in ("80", "60"):
            monkeypatch.setenv("COLUMNS", columns)
            assert main(["status", "--coordinator", address]) == 0
            narrow = capsys.readouterr().out
            assert max(len(line) for line in narrow.splitlines()) <= int(columns), narrow
            assert "127.0.0.1:7001" in narrow and "127.0.0.1:7002" in narrow and "300 MiB of 24.0 GiB" in narrow
            assert "(12/200" in narrow, narrow
            assert "decode 1.00 ms/layer" in narrow and "decode 3.00 ms/layer" in narrow, narrow
            assert "predicted bottleneck" in narrow and "ms/layer decode" not in narrow  # blocks, not the table
        monkeypatch.setenv("COLUMNS", "240")
        assert main(["status", "--coordinator", address]) == 0
        assert "ms/layer decode" in capsys.readouterr().out  # wide enough: the table
        monkeypatch.delenv("COLUMNS")
        assert main(["status", "--coordinator", address, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["num_layers"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        proc.stdout.close()
        proc.stderr.close()
    assert main(["status", "--coordinator", address]) == 2
    assert "unreachable" in capsys.readouterr().err
    # a stage host without the checkpoint needs the coordinator to fetch the model from
    stage = layerline("stage", "--coordinator", address, "--connect-timeout", "1", "--cache-dir", str(tmp_path))
    assert stage.returncode == 2 and f"the coordinator at {address} is unreachable" in stage.stderr, stage.stderr
    assert "Traceback" not in stage.stderr


def test_every_command_has_help_with_an_example():
    from layerline.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for name, p in sub.choices.items():
        text = p.format_help()
        assert f"example: layerline {name}" in text, name
        assert all(a.help for a in p._actions if a.dest != "help"), [a.dest for a in p._actions if not a.help]
    out = layerline("drain", "--help")
    assert out.returncode == 0 and "--wait" in out.stdout


def test_a_port_taken_is_a_clear_error(tiny_checkpoint):
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=4))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args in (
            ["coordinator", "--model", folder, "--port", port],
            ["stage", "--model", folder, "--layers", "0:2", "--port", port],
        ):
            out = layerline(*args)
            assert out.returncode == 2, out.stderr
            assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "port taken" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr


def test_progress_bars_show_on_request_and_not_in_pipes(tiny_checkpoint):
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=4))
    args = [sys.executable, "-m", "layerline.cli", "run", "--model", folder, "--stages", "2", "--max-new-tokens", "2"]
    shown = subprocess.run(
        args, capture_output=True, text=True, timeout=120, env={**os.environ, "LAYERLINE_PROGRESS": "1"}
    )
    assert shown.returncode == 0, shown.stderr
    assert "loading layers 0:2" in shown.stderr and "loading layers 2:4" in shown.stderr, shown.stderr
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=120)  # stderr is a pipe: no bars
    assert quiet.returncode == 0 and "loading layers" not in quiet.stderr


def test_stages_can_be_pinned_to_cores(tiny_checkpoint):
    from layerline.local_cluster import LocalCluster, pinned_cores

    folder, _ = tiny_checkpoint(TinySpec("llama", layers=4))
    cores = pinned_cores(2)
    if None in cores:
        pytest.skip("needs 2 cores")  # this project's machines have 2
    with LocalCluster(folder, [(0, 2), (2, 4)], threads=1, pin=True) as cluster:
        allowed = []
        for p in cluster.processes:
            with open(f"/proc/{p.pid}/status") as f:
                allowed.append(next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list:")))
        assert allowed == [str(c) for c in cores]
    out = layerline("stage", "--model", folder, "--layers", "0:2", "--cpus", "3-1")
    assert out.returncode == 2 and "expected CPU numbers and ranges like 0-3,8" in out.stderr
    out = layerline("stage", "--model", folder, "--layers", "0:2", "--cpus", "4096")
    assert out.returncode == 2 and "--cpus [4096]" in out.stderr and "Traceback" not in out.stderr


def test_a_move_to_another_chain_is_one_note_on_stderr(capsys):
    from layerline.cli.client import print_failover
    from layerline.client import Failover

    print_failover(Failover("session 1a2b3c4d", "UNAVAILABLE", ("10.0.0.2:7002",), 9.46, True, 40))
    out = capsys.readouterr()
    assert out.out == ""  # the answer's stream is left as it is
    assert out.err.count("\n") == 1 and out.err.startswith("layerline: stage 10.0.0.2:7002 stopped answering")
    assert "moved to another chain in 9.5 s" in out.err and "loaded them" in out.err  # the pause explained
    print_failover(Failover("a micro-batch of 4 rows", "the stream ended", (), 0.2, False, 12))
    assert "the chain failed (the stream ended)" in capsys.readouterr().err
