"""Choosing where a stage computes: `--device auto|cpu|cuda|cuda:N|mps` against what torch sees (given to the
resolver here, so the choices are tested the same with and without GPUs), the dtype a device defaults to, and the
weight form off the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from layerline.devices import (
    DeviceError,
    HostStaging,
    Visible,
    float_dtype,
    resolve_device,
    resolve_devices,
    weights_for,
)
from layerline.local_cluster import LocalCluster
from layerline.pipeline import LocalPipeline
from layerline.quant import resolve
from layerline.stage_server.config import StageConfig
from tiny_models import TinySpec

NONE = Visible(cuda=0, mps=False)
TWO_GPUS = Visible(cuda=2, mps=False)
MAC = Visible(cuda=0, mps=True)


def test_auto_takes_a_cuda_gpu_then_mps_then_the_cpu():
    assert resolve_device("auto", TWO_GPUS) == torch.device("cuda:0")
    assert resolve_device("auto", Visible(cuda=1, mps=True)) == torch.device("cuda:0")
    assert resolve_device("auto", MAC) == torch.device("mps")
    assert resolve_device("auto", NONE) == torch.device("cpu")


def test_named_devices_resolve_or_say_what_torch_sees():
    assert resolve_device("cpu", NONE) == torch.device("cpu")
    assert resolve_device("cuda", TWO_GPUS) == torch.device("cuda:0")
    assert resolve_device(" CUDA:1 ", TWO_GPUS) == torch.device("cuda:1")
    assert resolve_device("mps", MAC) == torch.device("mps")
    with pytest.raises(
        DeviceError, match=r"--device cuda:2: torch sees 2 CUDA device\(s\) here \(it sees cpu, cuda:0, cuda:1\)"
    ):
        resolve_device("cuda:2", TWO_GPUS)
    with pytest.raises(DeviceError, match=r"torch sees no CUDA device here \(it sees cpu, mps\)"):
        resolve_device("cuda", MAC)
    with pytest.raises(DeviceError, match=r"--device mps: torch sees no MPS device here \(it sees cpu, cuda:0"):
        resolve_device("mps", TWO_GPUS)
    with pytest.raises(DeviceError, match="cuda or cuda:N with N a number"):
        resolve_device("cuda:x", TWO_GPUS)
    with pytest.raises(DeviceError, match=r"--device tpu: not a device layerline knows \(auto, cpu, cuda"):
        resolve_device("tpu", TWO_GPUS)


def test_one_device_for_all_stages_or_one_each():
    assert resolve_devices("cuda:1", 3, TWO_GPUS) == [torch.device("cuda:1")] * 3
    assert resolve_devices("cuda:0, cpu,cuda:1", 3, TWO_GPUS) == [
        torch.device("cuda:0"),
        torch.device("cpu"),
        torch.device("cuda:1"),
    ]
    with pytest.raises(DeviceError, match=r"--devices names 2 device\(s\) for 3 stage\(s\)"):
        resolve_devices("cpu,cpu", 3, NONE)


def test_each_device_has_the_float_dtype_a_user_would_pick():
    assert float_dtype(torch.device("cuda:0"), TWO_GPUS) == torch.bfloat16
    assert float_dtype(torch.device("cuda:0"), Visible(cuda=1, mps=False, cuda_bf16=False)) == torch.float16
    assert float_dtype(torch.device("mps"), MAC) == torch.float16
    assert float_dtype(torch.device("cpu"), NONE) == torch.float32


def test_off_the_cpu_weights_are_float_and_quantizing_there_is_refused():
    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    assert weights_for(resolve(), cpu) == resolve()  # a GGUF file's blocks stay blocks on the CPU
    assert weights_for(resolve(quantize="int4"), cpu) == resolve(quantize="int4")
    assert weights_for(resolve(), gpu, TWO_GPUS) == resolve(torch.bfloat16)
    assert weights_for(resolve(torch.float32), gpu, TWO_GPUS) == resolve(torch.float32)  # the exact mode stays
    with pytest.raises(DeviceError, match="--quantize int8 computes on the CPU; on cuda:0 the weights are held in bf"):
        weights_for(resolve(quantize="int8"), gpu, TWO_GPUS)


def test_a_stage_config_resolves_its_device():
    assert StageConfig(model="m", start=0, end=1, device="cpu").device == "cpu"
    auto = StageConfig(model="m", start=0, end=1, device="auto")
    assert auto.device == str(resolve_device("auto"))  # whatever this machine has
    with pytest.raises(DeviceError, match="--device cuda:99: torch sees"):
        StageConfig(model="m", start=0, end=1, device="cuda:99")


def test_the_local_cluster_gives_each_stage_its_device():
    cluster = LocalCluster("m", [(0, 1), (1, 2)], devices=["cpu", "cuda:1"])
    argv = [cluster.command(r, None, d) for r, d in zip(cluster.ranges, cluster.devices, strict=True)]
    assert [a[a.index("--device") + 1] for a in argv] == ["cpu", "cuda:1"]
    assert "--device" not in LocalCluster("m", [(0, 1)]).command((0, 1))


def test_a_pipeline_takes_a_device_per_stage(tiny_checkpoint):
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=2))
    pipe = LocalPipeline.load(folder, [(0, 1), (1, 2)], torch.float32, device=["cpu", "cpu"])
    assert [s.device for s in pipe.stages] == [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match=r"1 device\(s\) for 2 stage\(s\)"):
        LocalPipeline.load(folder, [(0, 1), (1, 2)], device=["cpu"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--device", "cuda:99", "hi"], "--device cuda:99: torch sees"),
        (["run", "--devices", "cpu,cpu", "hi"], "--devices names 2 device(s) for 1 stage(s)"),
        (["stage", "--layers", "0:2", "--device", "tpu"], "--device tpu: not a device layerline knows"),
    ],
)
def test_the_cli_refuses_a_device_it_cannot_use(argv, message):
    out = subprocess.run([sys.executable, "-m", "layerline.cli", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_host_staging_reuses_its_buffers_from_step_to_step():
    """Off the CPU, hidden states go through host buffers kept between steps (pinned on CUDA). The mechanism is
    the same on every device, so it is exercised here with the buffers asked for on the CPU."""
    staging = HostStaging("cpu", staged=True)
    first = torch.randn(2, 3, 8)
    on = staging.to_device(first, torch.float32)
    assert torch.equal(on, first)
    back = staging.to_host(on, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and torch.equal(back, first.to(torch.bfloat16))
    grown, ptr = staging.grown, back.data_ptr()
    for rows in (1, 2, 1):  # decode steps no bigger than the first: no new buffer, the same memory
        x = torch.randn(rows, 3, 8)
        assert torch.equal(staging.to_device(x, torch.float32), x)
        out = staging.to_host(x * 2, torch.bfloat16)
        assert torch.equal(out, (x * 2).to(torch.bfloat16)) and out.data_ptr() == ptr
    assert staging.grown == grown
    big = torch.randn(4, 5, 8)  # a bigger step grows the buffer once
    assert torch.equal(staging.to_host(staging.to_device(big, torch.float32)), big)
    assert staging.grown > grown


def test_on_the_cpu_staging_copies_nothing():
    staging = HostStaging("cpu")
    x = torch.randn(1, 2, 4)
    assert staging.to_device(x, torch.float32) is x and staging.to_host(x) is x
    assert staging.grown == 0


def test_a_stage_says_which_device_it_computes_on_and_its_memory(tiny_checkpoint):
    import grpc

    from layerline.stage_server.capacity import device_memory
    from layerline.v1 import stage_pb2, stage_pb2_grpc

    memory = device_memory("cpu")
    assert memory.name.startswith("CPU") and 0 < memory.used < memory.total and memory.free <= memory.total
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=2))
    with LocalCluster(folder, [(0, 2)], devices=["cpu"]) as cluster:
        with grpc.insecure_channel(cluster.route[0]) as channel:
            info = stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)
    assert info.device == "cpu" and info.device_name == memory.name
    assert 0 < info.device_memory_used < info.device_memory_total == memory.total
