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
    route = stage_cluster(smollm2_path, split_layers(30, counts=counts))
    tok = Tokenizer.from_path(smollm2_path)
    ids = tok.encode_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    with Client(route) as client:
        out = client.generate(ids, max_new_tokens=20, stop_token_ids=[], stream=False)
    assert out.token_ids == hf_greedy(smollm2_transformers, ids, 20)
