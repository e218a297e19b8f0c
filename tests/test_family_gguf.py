"""Every family from GGUF files in llama.cpp's layout (written here with the `gguf` package: its tensor names and
metadata, experts stacked in ffn_*_exps, Gemma's norms stored as 1 + w), loaded by layerline and by transformers'
own GGUF reader (`from_pretrained(..., gguf_file=...)`): same greedy tokens from an F32 file, and from a Q8_0 file
layerline computes on the file's blocks with logits that stay transformers' up to 8-bit rounding.

transformers' reader takes some sizes from its config defaults rather than from the file (qwen3's head_dim, the
MoE families' expert sizes, Gemma's query_pre_attn_scalar of 256): the tiny models here are built with those
values, so that both readers see the same model. It reads no Mixtral file (llama.cpp writes Mixtral as a llama
with experts): that one is checked against transformers on the checkpoint the file was written from."""

from __future__ import annotations

import os

import pytest
import torch

from layerline.checkpoint import load_config
from layerline.pipeline import LocalPipeline, split_layers
from tiny_models import TinySpec, hf_greedy, hf_model, write_gguf

SPECS = {
    "qwen3": TinySpec("qwen3", extra=(("head_dim", 128),)),
    "phi3": TinySpec("phi3"),
    "gemma2": TinySpec("gemma2", tie=True, extra=(("head_dim", 256),)),
    "gemma3": TinySpec("gemma3", tie=True, extra=(("head_dim", 256),)),
    "qwen2_moe": TinySpec(
        "qwen2_moe", layers=2, extra=(("moe_intermediate_size", 1408), ("shared_expert_intermediate_size", 5632))
    ),
    "qwen3_moe": TinySpec("qwen3_moe", extra=(("norm_topk_prob", True), ("moe_intermediate_size", 768))),
    "mixtral": TinySpec("mixtral"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    made: dict[tuple[str, str], tuple[str, object]] = {}

    def make(family: str, qtype: str = "F32"):
        if (family, qtype) not in made:
            folder = tmp_path_factory.mktemp(f"{family}-{qtype}")
            model = hf_model(SPECS[family])
            write_gguf(model, str(folder / "model.gguf"), qtype)
            made[(family, qtype)] = (str(folder / "model.gguf"), model)
        return made[(family, qtype)]

    return make


def _transformers(path: str):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(SPECS))
def test_an_f32_file_gives_transformers_tokens(files, family):
    path, model = files(family)
    config = load_config(path)
    assert config.architecture == family
    spec = SPECS[family]
    oracle = model if family == "mixtral" else _transformers(path)
    pipe = LocalPipeline.load(path, split_layers(spec.layers, 2), torch.float32)
    ids = _ids(2, 13)
    with torch.no_grad():
        expected = oracle(ids).logits
    assert (pipe.forward(ids) - expected).abs().max().item() <= 1e-4
    prompt = [0, *_ids(1, 8, seed=2)[0].tolist()]
    assert list(pipe.generate(prompt, 32)) == hf_greedy(oracle, prompt, 32)


@pytest.mark.parametrize("family", list(SPECS))
def test_a_q8_file_is_computed_on_its_blocks(files, family):
    path, model = files(family, "Q8_0")
    spec = SPECS[family]
    pipe = LocalPipeline.load(path, split_layers(spec.layers, 2))  # the file's blocks, as stored
    assert all(s.quantized and "Q8_0" in s.weight_summary() for s in pipe.stages)
    oracle = model if family == "mixtral" else _transformers(path)  # transformers dequantizes the same blocks
    ids = _ids(2, 13)
    with torch.no_grad():
        expected = oracle(ids).logits
    got = pipe.forward(ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1)).min().item() > 0.995


def test_what_the_moe_files_say(files):
    qwen2 = load_config(files("qwen2_moe")[0])
    assert (qwen2.num_experts, qwen2.experts_per_token, qwen2.expert_intermediate_size) == (4, 2, 1408)
    assert qwen2.shared_expert_intermediate_size == 5632 and not qwen2.norm_topk_prob
    mixtral = load_config(files("mixtral")[0])
    assert mixtral.norm_topk_prob and mixtral.moe_layers == (True,) * 6
    gemma3 = load_config(files("gemma3")[0])
    assert gemma3.sliding_windows == (6,) * 5 + (None,) and gemma3.local_rope_theta == 10000.0
