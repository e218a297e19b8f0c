"""Selective batching across sessions (`StageModel.forward_many`): the decode steps of several sessions, each with
its own KV cache and its own length, go through a stage in one pass and give what each gives alone - the same
logits (within float tolerance) and the same greedy tokens, which are also transformers' tokens."""

from __future__ import annotations

import pytest
import torch

from layerline.errors import BadInputError
from layerline.pipeline import LocalPipeline, split_layers
from tiny_models import TinySpec, hf_greedy

SPECS = [
    TinySpec("llama", kv_heads=2, tie=True),
    TinySpec("mistral", kv_heads=2, extra=(("sliding_window", 6),)),
    TinySpec("qwen2", kv_heads=2),
]
PROMPTS = [[17, 101, 5, 250, 33, 42, 7, 199], [3, 9], [250, 1, 77, 64, 12], [8]]
STEPS = 10


def _pipe(tiny_checkpoint, spec: TinySpec) -> tuple[LocalPipeline, object]:
    folder, ref = tiny_checkpoint(spec)
    return LocalPipeline.load(folder, split_layers(spec.layers, counts=[2, 2, 2])), ref


def _decode_alone(pipe: LocalPipeline, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    caches = pipe.new_caches(rows=1, max_len=64)
    logits = pipe.forward(torch.tensor([prompt]), caches=caches)[:, -1]
    tokens, steps = [], []
    for _ in range(STEPS):
        tok = int(logits.argmax(-1))
        tokens.append(tok)
        logits = pipe.forward(torch.tensor([[tok]]), caches=caches)[:, -1]
        steps.append(logits)
    return tokens, steps


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_sessions_decoded_together_give_what_each_gives_alone(tiny_checkpoint, spec):
    pipe, ref = _pipe(tiny_checkpoint, spec)
    alone = [_decode_alone(pipe, p) for p in PROMPTS]
    for (tokens, _), prompt in zip(alone, PROMPTS, strict=True):
        assert tokens == hf_greedy(ref, prompt, STEPS)
    got, caches = _decode_together(pipe, alone)
    assert got == [tokens for tokens, _ in alone]
    assert [cs[0].lengths for cs in caches] == [[len(p) + STEPS] for p in PROMPTS]


def _decode_together(pipe: LocalPipeline, alone: list[tuple[list[int], list[torch.Tensor]]]):
    """The PROMPTS as sessions prefilled one by one (different lengths), then decoded in one batched pass per step
    (`forward_many`), each step's logits checked against `alone` (what each session gives by itself). Returns
    (each session's tokens, their caches)."""
    caches = [pipe.new_caches(rows=1, max_len=64) for _ in PROMPTS]
    next_ids = [
        int(pipe.forward(torch.tensor([p]), caches=cs)[:, -1].argmax(-1)) for p, cs in zip(PROMPTS, caches, strict=True)
    ]
    lengths = [len(p) for p in PROMPTS]
    got: list[list[int]] = [[] for _ in PROMPTS]
    for step in range(STEPS):
        hs = [torch.tensor([[t]]) for t in next_ids]
        for si, stage in enumerate(pipe.stages):
            parts = [(h, torch.tensor([[n]]), cs[si], [0]) for h, n, cs in zip(hs, lengths, caches, strict=True)]
            hs = stage.forward_many(parts, last_only=True)
        for i, logits in enumerate(hs):
            assert (logits[:, -1] - alone[i][1][step]).abs().max().item() <= 1e-4, (i, step)
            got[i].append(next_ids[i])
            next_ids[i] = int(logits[:, -1].argmax(-1))
        lengths = [n + 1 for n in lengths]
    return got, caches


def test_batched_steps_are_checked_like_single_ones(tiny_checkpoint):
    pipe, _ = _pipe(tiny_checkpoint, SPECS[0])
    first = pipe.stages[0]
    a, b = first.new_cache(1, 16), first.new_cache(1, 16)
    one = torch.tensor([[5]])
    with pytest.raises(ValueError, match="cache of its own"):
        first.forward_many([(one, torch.tensor([[0]]), a, [0]), (one, torch.tensor([[0]]), a, [0])])
    with pytest.raises(BadInputError, match="same width"):
        first.forward_many(
            [(one, torch.tensor([[0]]), a, [0]), (torch.tensor([[5, 6]]), torch.tensor([[0, 1]]), b, [0])]
        )
    # a position gap in one part fails the whole step and leaves every cache as it was
    with pytest.raises(BadInputError, match="does not continue"):
        first.forward_many([(one, torch.tensor([[0]]), a, [0]), (one, torch.tensor([[3]]), b, [0])])
    assert a.lengths == [0] and b.lengths == [0]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_packed_weights_give_what_plain_weights_give(tiny_checkpoint, spec):
    """`pack_weights`: steps of 4 rows or more go through oneDNN's packed copy (batched decode steps, prefill);
    the logits stay within float tolerance of the plain weights' and the greedy tokens are transformers'."""
    plain, ref = _pipe(tiny_checkpoint, spec)
    packed, _ = _pipe(tiny_checkpoint, spec)
    before = [s.weight_bytes() for s in packed.stages]
    for stage in packed.stages:
        stage.pack_weights()
        stage.pack_weights()  # a second call packs nothing more
    assert all(s.packed_bytes > 0 for s in packed.stages)
    assert [s.weight_bytes() - s.packed_bytes for s in packed.stages] == before
    # a prefill of 8 positions (packed) against the plain weights
    ids = torch.tensor([PROMPTS[0]])
    assert (packed.forward(ids) - plain.forward(ids)).abs().max().item() <= 1e-4
    # 4 sessions decoded together (4 rows: packed) against each alone on the plain weights
    alone = [_decode_alone(plain, p) for p in PROMPTS]
    got, _ = _decode_together(packed, alone)
    assert got == [tokens for tokens, _ in alone] == [hf_greedy(ref, p, STEPS) for p in PROMPTS]


def test_packed_weights_are_float32_on_cpu_only(tiny_checkpoint):
    from layerline.checkpoint import load_stage
    from layerline.stage_server.config import StageConfig

    folder, _ = tiny_checkpoint(SPECS[0])
    stage = load_stage(folder, 0, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="packed weights are for float32 on CPU, not bfloat16 on cpu"):
        stage.pack_weights()
    with pytest.raises(ValueError, match="--pack-weights: packed weights are for float32"):
        StageConfig(model=folder, start=0, end=2, dtype=torch.float16, pack_weights=True)
