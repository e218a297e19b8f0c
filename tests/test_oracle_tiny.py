"""The oracle: layerline's stages chained in one process must compute what transformers computes on the same
checkpoint (tiny random llama / mistral / qwen2 folders written by `save_pretrained`), for any split."""

from __future__ import annotations

import pytest
import torch

from layerline.pipeline import LocalPipeline, split_layers
from tiny_models import TinySpec, hf_greedy

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
SPECS = [
    TinySpec("llama", kv_heads=2, tie=True),
    TinySpec("llama", kv_heads=4, extra=(("rope_scaling", {"rope_type": "linear", "factor": 2.0}),)),
    TinySpec(
        "llama",
        kv_heads=1,
        shard_bytes=60_000,
        extra=(("rope_scaling", LLAMA3_ROPE), ("attention_bias", True), ("mlp_bias", True)),
    ),
    TinySpec("mistral", kv_heads=2, extra=(("sliding_window", 6),)),
    TinySpec("qwen2", kv_heads=2),
    TinySpec("qwen2", kv_heads=2, tie=True),
]
SPLITS = [[6], [3, 3], [2, 2, 2], [1, 4, 1]]


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (batch, length), generator=g)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("counts", SPLITS, ids=["x".join(map(str, c)) for c in SPLITS])
def test_logits_match_transformers(tiny_checkpoint, spec, counts):
    folder, ref = tiny_checkpoint(spec)
    pipe = LocalPipeline.load(folder, split_layers(spec.layers, counts=counts))
    ids = _ids(2, 17)
    with torch.no_grad():
        expected = ref(ids).logits
    full = pipe.forward(ids)  # no cache: the whole sequence at once
    assert (full - expected).abs().max().item() <= 1e-4
    # the same through the KV cache: a prefill chunk, one token, then another chunk
    caches = pipe.new_caches(rows=2, max_len=32)
    parts = [pipe.forward(ids[:, a:b], caches=caches) for a, b in ((0, 7), (7, 8), (8, 17))]
    assert (torch.cat(parts, dim=1) - expected).abs().max().item() <= 1e-4
    assert all(c.lengths == [17, 17] for c in caches)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("counts", SPLITS, ids=["x".join(map(str, c)) for c in SPLITS])
def test_greedy_tokens_match_transformers_generate(tiny_checkpoint, spec, counts):
    folder, ref = tiny_checkpoint(spec)
    pipe = LocalPipeline.load(folder, split_layers(spec.layers, counts=counts))
    prompt = [0, *_ids(1, 8, seed=2)[0].tolist()]  # starts with token 0, also the pad id transformers is given
    expected = hf_greedy(ref, prompt, 32)
    assert len(expected) == 32
    assert list(pipe.generate(prompt, 32)) == expected


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_batch_of_different_lengths_equals_each_prompt_alone(tiny_checkpoint, spec):
    folder, ref = tiny_checkpoint(spec)
    pipe = LocalPipeline.load(folder, split_layers(spec.layers, counts=[2, 3, 1]))
    prompts = [_ids(1, n, seed=n)[0].tolist() for n in (3, 11, 5, 1)]
    alone = [list(pipe.generate(p, 12)) for p in prompts]
    oracle = [hf_greedy(ref, p, 12) for p in prompts]
    assert alone == oracle
    assert pipe.generate_batch(prompts, 12) == alone
    assert pipe.generate_batch(prompts, 12, prefill_chunk=4) == alone


def test_sliding_window_is_applied(tiny_checkpoint):
    """Guards the mistral case above against passing vacuously: without the window the logits differ."""
    spec = SPECS[3]
    folder, ref = tiny_checkpoint(spec)
    pipe = LocalPipeline.load(folder, [(0, 6)])
    ids = _ids(1, 20)
    windowed = pipe.forward(ids)
    stage = pipe.stages[0]
    stage.windows = {None}
    for block in stage.layers:
        block.window = None
    unwindowed = pipe.forward(ids)
    assert (windowed[:, :6] - unwindowed[:, :6]).abs().max() < 1e-5  # inside the window nothing changes
    assert (windowed[:, 6:] - unwindowed[:, 6:]).abs().max() > 1e-3
