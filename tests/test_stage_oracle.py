"""The oracle over the network: stage servers in subprocesses (real gRPC on 127.0.0.1) must give the same greedy
tokens as transformers running the checkpoint in one process, for 1, 2, 3 stages and an uneven split, on tiny
llama / qwen2 checkpoints and on the SmolLM2 GGUF."""

from __future__ import annotations

import pytest
import torch

from layerline.client import Client
from layerline.pipeline import split_layers
from layerline.tokenizer import Tokenizer
from tiny_models import TinySpec, hf_greedy

TINY = [TinySpec("llama", layers=6, kv_heads=2, tie=True), TinySpec("qwen2", layers=6, kv_heads=2)]
SPLITS = [[6], [3, 3], [2, 2, 2], [1, 4, 1]]


@pytest.mark.parametrize("spec", TINY, ids=[s.name for s in TINY])
@pytest.mark.parametrize("counts", SPLITS, ids=["x".join(map(str, c)) for c in SPLITS])
def test_tiny_models_over_grpc_match_transformers(tiny_checkpoint, stage_cluster, spec, counts):
    folder, ref = tiny_checkpoint(spec)
    route = stage_cluster(folder, split_layers(spec.layers, counts=counts))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 9, 40)]
    with Client(route) as client:
        for prompt in prompts:
            out = client.generate(prompt, max_new_tokens=24, stop_token_ids=[], stream=False)
            assert out.token_ids == hf_greedy(ref, prompt, 24)
            assert out.prompt_token_ids == prompt and out.finish_reason == "length"


@pytest.mark.parametrize("counts", [[30], [15, 15], [10, 10, 10], [4, 20, 6]], ids=["1", "2", "3", "4x20x6"])
def test_smollm2_over_grpc_matches_transformers(stage_cluster, smollm2_path, smollm2_transformers, counts):
    route = stage_cluster(smollm2_path, split_layers(30, counts=counts), "--dtype", "float32")  # the exact mode
    tok = Tokenizer.from_path(smollm2_path)
    ids = tok.encode_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    with Client(route) as client:
        out = client.generate(ids, max_new_tokens=20, stop_token_ids=[], stream=False)
    assert out.token_ids == hf_greedy(smollm2_transformers, ids, 20)


def test_bfloat16_wire_equals_rounding_hidden_states_in_process(tiny_checkpoint, stage_cluster):
    """Hidden states sent as bfloat16 are exactly the float32 ones rounded: the oracle is the in-process pipeline
    with that rounding between the stages."""
    spec = TINY[1]
    folder, _ = tiny_checkpoint(spec)
    route = stage_cluster(folder, [(0, 3), (3, 6)], "--wire-dtype", "bfloat16")
    from layerline.pipeline import LocalPipeline

    pipe = LocalPipeline.load(folder, [(0, 3), (3, 6)])
    prompt = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(9)).tolist()
    caches = pipe.new_caches(1, 64)
    expected, ids = [], torch.tensor([prompt])
    for _ in range(16):
        h = pipe.stages[0](ids, cache=caches[0])
        logits = pipe.stages[1](h.to(torch.bfloat16).to(torch.float32), cache=caches[1], last_only=True)
        expected.append(int(logits[0, -1].argmax()))
        ids = torch.tensor([[expected[-1]]])
    with Client(route) as client:
        got = client.generate(prompt, max_new_tokens=16, stop_token_ids=[], stream=False).token_ids
    assert got == expected


def test_int8_wire_equals_its_round_trip_in_process(tiny_checkpoint, stage_cluster):
    """Hidden states sent as int8 rows (a scale per token) are the float32 ones through that codec and back: the
    oracle is the in-process pipeline with the codec between the stages; asked by the stages' flag or by the
    client for its session."""
    from layerline import wire
    from layerline.client import ClientConfig
    from layerline.pipeline import LocalPipeline

    spec = TINY[1]
    folder, _ = tiny_checkpoint(spec)
    pipe = LocalPipeline.load(folder, [(0, 3), (3, 6)])
    prompt = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(9)).tolist()
    caches = pipe.new_caches(1, 64)
    expected, ids, error = [], torch.tensor([prompt]), 0.0
    for _ in range(16):
        h = pipe.stages[0](ids, cache=caches[0])
        sent = wire.decode(wire.encode(h, torch.int8), "hidden")
        error = max(error, float(((sent - h).abs() / h.abs().amax(-1, keepdim=True)).max()))
        logits = pipe.stages[1](sent, cache=caches[1], last_only=True)
        expected.append(int(logits[0, -1].argmax()))
        ids = torch.tensor([[expected[-1]]])
    assert 0 < error <= 0.5 / 127 + 1e-6  # at most half a step of the row's scale
    for route, cfg in (
        (stage_cluster(folder, [(0, 3), (3, 6)], "--wire-dtype", "int8"), ClientConfig()),
        (stage_cluster(folder, [(0, 3), (3, 6)]), ClientConfig(wire_dtype="int8")),
    ):
        with Client(route, config=cfg) as client:
            got = client.generate(prompt, max_new_tokens=16, stop_token_ids=[], stream=False).token_ids
        assert got == expected


def test_long_prompt_is_prefilled_in_chunks(tiny_checkpoint, stage_cluster):
    from layerline.client import ClientConfig

    spec = TINY[0]
    folder, ref = tiny_checkpoint(spec)
    route = stage_cluster(folder, [(0, 2), (2, 6)])
    prompt = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(10)).tolist()
    with Client(route, config=ClientConfig(prefill_chunk=16)) as client:
        out = client.generate(prompt, max_new_tokens=8, stop_token_ids=[], stream=False)
    assert out.token_ids == hf_greedy(ref, prompt, 8)


def test_smollm2_streams_multibyte_text_cleanly(stage_cluster, smollm2_path):
    route = stage_cluster(smollm2_path, split_layers(30, counts=[10, 10, 10]))
    with Client(route) as client:
        pieces = list(
            client.chat([{"role": "user", "content": "Write 'naïve café' and a smiley emoji 😊."}], max_new_tokens=40)
        )
        tok = client.tokenizer()
    ids = [p.token_id for p in pieces]
    text = "".join(p.text for p in pieces)
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p.text for p in pieces)
    assert any(ord(ch) > 127 for ch in text), text  # the answer does contain non-ASCII characters
