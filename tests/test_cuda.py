"""Stages on a CUDA GPU, checked against transformers on the same GPU: float32 tokens identical, bf16 logits within
a stated tolerance, a GPU stage and a CPU stage in one chain giving the tokens of one process, the host buffers of
a hop pinned and reused, and the GPU's own memory in what a stage reports. Skipped where torch sees no CUDA GPU
(`scripts/gpu-check` runs them on one)."""

from __future__ import annotations

import pytest
import torch

from layerline.devices import HostStaging, device_memory
from layerline.pipeline import LocalPipeline, split_layers
from tiny_models import TinySpec, hf_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check)")

SPECS = [TinySpec("llama", kv_heads=2, tie=True), TinySpec("qwen2", kv_heads=2), TinySpec("mistral", kv_heads=1)]
BF16_LOGITS = 0.1  # bf16 logits against transformers' bf16 on the same GPU (magnitudes ~10): max abs difference


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_float32_on_the_gpu_gives_transformers_tokens_and_logits(tiny_checkpoint, spec):
    folder, ref = tiny_checkpoint(spec)
    ref = ref.to("cuda")
    pipe = LocalPipeline.load(folder, split_layers(spec.layers, counts=[3, 3]), torch.float32, device="cuda")
    assert all(s.device.type == "cuda" and s.rotary.inv_freq.is_cuda for s in pipe.stages)
    ids = _ids(2, 17)
    with torch.no_grad():
        expected = ref(ids.cuda()).logits
    caches = pipe.new_caches(rows=2, max_len=32)
    assert caches[0].k.is_cuda
    got = torch.cat([pipe.forward(ids[:, a:b], caches=caches) for a, b in ((0, 7), (7, 8), (8, 17))], dim=1)
    assert got.is_cuda and (got - expected).abs().max().item() <= 1e-4
    prompt = [0, *_ids(1, 8, seed=2)[0].tolist()]
    assert list(pipe.generate(prompt, 24)) == hf_greedy(ref.cpu(), prompt, 24)


@pytest.mark.parametrize("spec", SPECS[:1], ids=[s.name for s in SPECS[:1]])
def test_bf16_on_the_gpu_is_within_tolerance_of_transformers_bf16(tiny_checkpoint, spec):
    folder, ref = tiny_checkpoint(spec)
    ref = ref.to("cuda", torch.bfloat16)
    pipe = LocalPipeline.load(folder, [(0, spec.layers)], device="cuda")  # no dtype: the GPU's own (bf16)
    assert pipe.stages[0].dtype == torch.bfloat16
    ids = _ids(2, 17)
    with torch.no_grad():
        expected = ref(ids.cuda()).logits.float()
    got = pipe.forward(ids).float()
    assert (got - expected).abs().max().item() <= BF16_LOGITS


def test_a_gpu_stage_and_a_cpu_stage_give_the_tokens_of_one_process(tiny_checkpoint):
    spec = SPECS[1]
    folder, ref = tiny_checkpoint(spec)
    ranges = split_layers(spec.layers, counts=[4, 2])
    mixed = LocalPipeline.load(folder, ranges, torch.float32, device=["cuda", "cpu"])
    alone = LocalPipeline.load(folder, [(0, spec.layers)], torch.float32)
    prompts = [_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 5)]
    assert mixed.generate_batch(prompts, 16) == alone.generate_batch(prompts, 16)
    assert [list(mixed.generate(p, 16)) for p in prompts] == [hf_greedy(ref, p, 16) for p in prompts]


def test_a_gpu_stage_over_grpc_next_to_a_cpu_stage(tiny_checkpoint):
    """The same over the wire: hidden states cross through the GPU stage's pinned buffers."""
    pytest.importorskip("grpc_health", reason="the stage server's dependencies")
    from layerline.client import Client
    from layerline.local_cluster import LocalCluster

    spec = SPECS[0]
    folder, ref = tiny_checkpoint(spec)
    prompt = [0, *_ids(1, 8, seed=3)[0].tolist()]
    expected = hf_greedy(ref, prompt, 16)
    with LocalCluster(folder, [(0, 3), (3, 6)], dtype="float32", devices=["cuda", "cpu"]) as cluster:
        with Client(cluster.route) as client:
            out = client.generate(prompt, max_new_tokens=16, stop_token_ids=[], stream=False)
    assert out.token_ids == expected


def test_host_buffers_are_pinned_and_reused():
    staging = HostStaging("cuda")
    x = torch.randn(2, 5, 64)
    on = staging.to_device(x, torch.bfloat16)
    assert on.is_cuda and on.dtype == torch.bfloat16
    back = staging.to_host(on, torch.float32)
    assert back.is_pinned() and torch.equal(back, x.to(torch.bfloat16).float())
    grown, ptr = staging.grown, back.data_ptr()
    for _ in range(3):
        y = torch.randn(1, 1, 64)
        out = staging.to_host(staging.to_device(y, torch.float32))
        assert torch.equal(out, y) and out.data_ptr() == ptr
    assert staging.grown == grown


def test_the_gpu_reports_its_own_memory():
    held = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    m = device_memory("cuda")
    assert m.name == torch.cuda.get_device_name(0) and m.used >= held.numel() and m.total > m.free > 0
