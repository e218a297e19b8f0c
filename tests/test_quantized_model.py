"""Stages on quantized weights: GGUF files load as their blocks (the default), float checkpoints quantize at load
(`quantize="int8" / "int4"`), and the exact mode (a dtype given) stays as it was.

Oracles: the same file in the exact mode (every weight decoded to float32, itself checked against transformers in
test_gguf_model.py and test_real_model.py) and, for quality, perplexity on a real text (llama.cpp's own
`llama-perplexity` on the same file is the bench's oracle: bench/vs_llamacpp.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import grpc
import pytest
import torch

import layerline.quant.linear as qlinear
from layerline.checkpoint import load_stage, open_checkpoint
from layerline.client import Client
from layerline.model import QuantBlock, StageModel, expected_tensors
from layerline.pipeline import LocalPipeline, split_layers
from layerline.quant.tensor import quantize, quantized_type
from layerline.tokenizer import Tokenizer
from layerline.v1 import stage_pb2, stage_pb2_grpc
from tiny_models import TinySpec, write_gguf

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # what the gguf package can write; k-quants: test_quant_kernels


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, tmp_path_factory):
    made = {}

    def make(spec: TinySpec, qtype: str) -> str:
        key = (repr(spec), qtype)
        if key not in made:
            _, model = tiny_checkpoint(spec)
            path = str(tmp_path_factory.mktemp("qgguf") / f"m.{qtype}.gguf")
            write_gguf(model, path, qtype)
            made[key] = path
        return made[key]

    return make


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("spec", [TinySpec("llama", layers=4, kv_heads=2, tie=True), TinySpec("qwen2", layers=4)])
def test_a_gguf_file_stays_quantized_and_computes_what_the_exact_mode_does(tiny_gguf, spec, qtype):
    path = tiny_gguf(spec, qtype)
    quantized = LocalPipeline.load(path, [(0, 4)])
    exact = LocalPipeline.load(path, [(0, 4)], torch.float32)
    stage = quantized.stages[0]
    assert stage.quantized and all(isinstance(b, QuantBlock) for b in stage.layers)
    ckpt = open_checkpoint(path)
    assert stage.weight_bytes() == ckpt.stored_bytes(list(expected_tensors(ckpt.config, 0, 4)))  # the file's size
    assert stage.weight_bytes() < exact.stages[0].weight_bytes()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    # prefill of few rows runs the 8-bit kernels (as does every decode step): close to the exact mode
    assert rel(quantized.forward(ids), exact.forward(ids)) < 0.05
    # stages cut anywhere compute the same numbers (the hidden states between them stay float32)
    split = LocalPipeline.load(path, [(0, 1), (1, 3), (3, 4)])
    assert torch.equal(split.forward(ids), quantized.forward(ids))
    # the Q/K row permutation llama.cpp applies is undone on the blocks too: greedy tokens of both modes agree
    prompt = ids[0].tolist()
    assert list(quantized.generate(prompt, 8)) == list(exact.generate(prompt, 8))


def test_many_rows_are_computed_from_decoded_tiles_exactly(tiny_gguf, monkeypatch):
    path = tiny_gguf(TinySpec("llama", layers=4, kv_heads=2), "Q5_1")  # a type the kernels keep in row layout
    quantized, exact = LocalPipeline.load(path, [(0, 4)]), LocalPipeline.load(path, [(0, 4)], torch.float32)
    assert not any(lin.interleaved for lin in quantized.stages[0].quant_linears())
    ids = torch.randint(0, 300, (1, qlinear.TILE_MIN_ROWS + 3), generator=torch.Generator().manual_seed(1))
    # float activations times decoded weights: the exact mode's numbers up to summation order
    assert rel(quantized.forward(ids), exact.forward(ids)) < 1e-4
    monkeypatch.setattr(qlinear, "TILE_MIN_ROWS", 1 << 30)  # the same rows through the 8-bit kernels
    assert rel(quantized.forward(ids), exact.forward(ids)) < 0.05


def test_interleaved_weights_take_the_kernels_at_every_row_count(tiny_gguf, monkeypatch):
    path = tiny_gguf(TinySpec("llama", layers=4, kv_heads=2), "Q4_1")
    quantized, exact = LocalPipeline.load(path, [(0, 4)]), LocalPipeline.load(path, [(0, 4)], torch.float32)
    assert all(lin.interleaved for lin in quantized.stages[0].quant_linears())
    ids = torch.randint(0, 300, (1, qlinear.TILE_MIN_ROWS + 3), generator=torch.Generator().manual_seed(1))
    many = quantized.forward(ids)
    assert 1e-4 < rel(many, exact.forward(ids)) < 0.05  # 8-bit activations: not the tiles' float numbers
    monkeypatch.setattr(qlinear, "TILE_MIN_ROWS", 1 << 30)
    assert torch.equal(quantized.forward(ids), many)


def test_batched_sessions_on_quantized_weights_equal_each_session_alone(tiny_gguf):
    path = tiny_gguf(TinySpec("qwen2", layers=4, kv_heads=2), "Q4_0")
    stage = load_stage(path, 0, 4)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (1, n), generator=g) for n in (5, 9, 3, 7, 6)]
    alone, caches = [], []
    for p in prompts:
        cache = stage.new_cache(1, 32)
        stage.forward(p, cache=cache)
        alone.append(stage.forward(torch.tensor([[11]]), torch.tensor([[p.shape[1]]]), cache))
        cache = stage.new_cache(1, 32)
        stage.forward(p, cache=cache)
        caches.append(cache)
    parts = [
        (torch.tensor([[11]]), torch.tensor([[p.shape[1]]]), c, None) for p, c in zip(prompts, caches, strict=True)
    ]
    together = stage.forward_many(parts)  # 5 sessions: kernel row groups of 4 and 1
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("paged", [False, True])
def test_a_speculative_step_computes_what_its_decode_steps_do(tiny_gguf, qtype, paged):
    """A speculative decoding step (the last token and its proposals as one step of a few columns) must give, at
    each position, the logits the decode steps of those tokens one by one give: the same kernels in the same order,
    so that greedy verification accepts exactly what plain greedy decoding would have produced."""
    from layerline.paged_kv import BlockPool, PagedCache

    stage = load_stage(tiny_gguf(TinySpec("llama", layers=4, kv_heads=2), qtype), 0, 4)
    c = stage.config

    def cache():
        if not paged:
            return stage.new_cache(1, 64)
        pool = BlockPool(stage.num_layers, c.num_kv_heads, c.head_dim, 8, 16)
        return PagedCache(pool, 1, 64)

    g = torch.Generator().manual_seed(3)
    prompt, step = torch.randint(0, 300, (1, 14), generator=g), torch.randint(0, 300, (1, 6), generator=g)
    one, many = cache(), cache()
    stage.forward(prompt, cache=one)
    stage.forward(prompt, cache=many)
    singles = [stage.forward(step[:, t : t + 1], cache=one) for t in range(step.shape[1])]  # positions 14, 15, ...
    together = stage.forward(step, cache=many, decode_columns=True)  # across a block boundary (16) when paged
    for t, single in enumerate(singles):
        assert torch.equal(together[:, t], single[:, 0]), t
    assert many.lengths == one.lengths == [20]


@pytest.mark.parametrize("how, layer_bytes_per_32", [("int8", 34), ("int4", 20)])
def test_a_float_checkpoint_quantizes_at_load(tiny_checkpoint, how, layer_bytes_per_32):
    spec = TinySpec("llama", layers=4, kv_heads=2, hidden=64, intermediate=128)
    folder, _ = tiny_checkpoint(spec)
    exact = LocalPipeline.load(folder, [(0, 4)], torch.float32)
    quantized = LocalPipeline.load(folder, split_layers(4, counts=[2, 2]), quantize=how)
    assert all(s.quantized for s in quantized.stages)
    shapes = expected_tensors(exact.config, 0, 4)
    layers = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and n.startswith("model.layers."))
    tables = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and not n.startswith("model.layers."))
    norms = sum(math.prod(s) for s in shapes.values() if len(s) == 1)
    # blocks of 32 values: 34 bytes (Q8_0) or 20 (Q4_1); the embedding and LM head stay at Q8_0; norms float32
    want = layers * layer_bytes_per_32 // 32 + tables * 34 // 32 + 4 * norms
    assert sum(s.weight_bytes() for s in quantized.stages) == want
    # the oracle: a float32 model of the same blocks decoded (how much 4 bits cost real weights: the perplexity
    # test below; on random weights it is large)
    ckpt = open_checkpoint(folder)
    tensors = ckpt.read(list(shapes), torch.float32)
    for n, t in tensors.items():
        if t.dim() == 2:
            tensors[n] = quantize(t, quantized_type(how, n)).dequantize()
    decoded = StageModel(exact.config, 0, 4, tensors)
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(3))
    a, b = quantized.forward(ids), decoded.forward(ids)
    assert ((a - b).norm() / b.norm()).item() < 0.03


def test_the_real_model_holds_its_share_of_the_file_and_keeps_its_quality(smollm2_path, monkeypatch):
    """SmolLM2-135M Q4_1: each stage of a split holds exactly its tensors' bytes in the file, and perplexity on a
    real text through the 8-bit kernels is within 2% of the exact mode's."""
    ckpt = open_checkpoint(smollm2_path)
    ranges = split_layers(30, counts=[12, 18])
    pipe = LocalPipeline.load(smollm2_path, ranges)
    for stage, (a, b) in zip(pipe.stages, ranges, strict=True):
        assert stage.weight_bytes() == ckpt.stored_bytes(list(expected_tensors(ckpt.config, a, b)))
        assert "Q4_1" in stage.weight_summary() and stage.weight_summary().startswith("quantized: ")
    exact = LocalPipeline.load(smollm2_path, ranges, torch.float32)
    tok = Tokenizer.from_path(smollm2_path)
    with open(os.path.join(os.path.dirname(os.__file__), "LICENSE.txt"), encoding="utf-8") as f:
        ids = tok.encode(f.read())[:512]

    def perplexity(p: LocalPipeline) -> float:
        logp = torch.log_softmax(p.forward(torch.tensor([ids]))[0].double(), -1)
        return math.exp(-logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item())

    reference = perplexity(exact)
    monkeypatch.setattr(qlinear, "TILE_MIN_ROWS", 1 << 30)  # every matmul through the kernels, as decode runs
    assert abs(perplexity(pipe) / reference - 1) < 0.02, reference
    for how in ("int8", "int4"):  # the file's float weights quantized again at load: Q8_0 / Q4_1 blocks
        again = LocalPipeline.load(smollm2_path, ranges, quantize=how)
        assert abs(perplexity(again) / reference - 1) < 0.02, (how, reference)


def test_quantized_stages_over_grpc_give_the_in_process_tokens(stage_cluster, smollm2_path):
    route = stage_cluster(smollm2_path, split_layers(30, counts=[10, 20]))
    tok = Tokenizer.from_path(smollm2_path)
    ids = tok.encode_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    expected = list(LocalPipeline.load(smollm2_path, split_layers(30, counts=[10, 20])).generate(ids, 16))
    with Client(route) as client:
        out = client.generate(ids, max_new_tokens=16, stop_token_ids=[], stream=False)
    assert out.token_ids == expected
    infos = []
    for address in route:
        with grpc.insecure_channel(address) as channel:
            infos.append(stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10))
    ckpt = open_checkpoint(smollm2_path)
    for info in infos:
        share = ckpt.stored_bytes(list(expected_tensors(ckpt.config, info.start_layer, info.end_layer)))
        assert info.weight_bytes == share and "Q4_1" in info.weights and info.weights.startswith("quantized: ")
        assert info.resident_bytes > info.weight_bytes


def test_without_the_kernels_a_stage_holds_float32_and_says_what_it_costs(tiny_gguf, tmp_path):
    path = tiny_gguf(TinySpec("llama", layers=2, kv_heads=2), "Q8_0")
    code = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
        "from layerline.checkpoint import load_stage\n"
        f"s = load_stage({path!r}, 0, 2)\n"
        "print(s.quantized, s.weight_summary())\n"
    )
    env = dict(os.environ, LAYERLINE_KERNELS="off")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "float32"]
    assert "turned off (LAYERLINE_KERNELS=off); loading float32 weights instead of quantized ones" in out.stderr
    assert "MiB for these layers instead of" in out.stderr


def test_tokens_do_not_depend_on_the_thread_count(smollm2_path):
    """A replica with another thread count must continue a generation with the same tokens (failover): on 8-bit
    activations a last-bit difference in attention can change a token, so decode attention sums in a fixed
    order (with torch's SDPA this prompt's fourth token differed between 1 and 2 threads)."""
    tok = Tokenizer.from_path(smollm2_path)
    ids = tok.encode_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    long_prompt = torch.randint(0, 40000, (1, 300), generator=torch.Generator().manual_seed(4))
    pipe = LocalPipeline.load(smollm2_path, split_layers(30, counts=[10, 20]))
    before = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out[n] = (list(pipe.generate(ids, 16)), pipe.forward(long_prompt))
    finally:
        torch.set_num_threads(before)
    assert out[1][0] == out[2][0]
    assert torch.equal(out[1][1], out[2][1])


def test_decode_in_one_call_computes_what_the_layers_compute_one_by_one(tiny_gguf):
    """A stage's decode step runs through all its layers in one kernel call (quant/decode.py); it must compute
    what the layer-by-layer path does (which attends with torch's SDPA, so: to float rounding), cache included."""
    path = tiny_gguf(TinySpec("qwen2", layers=4, kv_heads=2), "Q8_0")
    stage = load_stage(path, 0, 4)
    assert stage.decoder is not None
    prompt = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(5))
    out, caches = [], []
    for fused in (True, False):
        decoder, stage.decoder = stage.decoder, stage.decoder if fused else None
        cache = stage.new_cache(2, 16)
        stage.forward(prompt, cache=cache)
        steps = [stage.forward(torch.tensor([[7], [9]]), torch.tensor([[6 + i], [6 + i]]), cache) for i in range(3)]
        out.append(torch.cat(steps, 1))
        caches.append(cache)
        stage.decoder = decoder
    assert rel(out[0], out[1]) < 1e-5
    assert rel(caches[0].k, caches[1].k) < 1e-5 and rel(caches[0].v, caches[1].v) < 1e-5
    assert torch.equal(caches[0].k[0], caches[1].k[0])  # the first layer's keys: the same arithmetic exactly
