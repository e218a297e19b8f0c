"""GGUF checkpoints against the oracle: tiny models written as GGUF the way llama.cpp's converter writes them
(Q/K rows permuted, weights F32 / F16 / Q8_0 / Q4_0), loaded by layerline split into stages and by transformers
with `gguf_file=`; both must compute the same logits and the same greedy tokens."""

from __future__ import annotations

import os

import gguf
import pytest
import torch

from layerline.checkpoint import load_config, load_stage
from layerline.errors import CheckpointError, UnsupportedModelError
from layerline.pipeline import LocalPipeline
from tiny_models import TinySpec, hf_greedy, write_gguf

CASES = [
    (TinySpec("llama", layers=4, kv_heads=2, tie=True), "F32"),
    (TinySpec("llama", layers=4, kv_heads=1), "Q8_0"),
    (TinySpec("llama", layers=4, kv_heads=4), "F16"),
    (TinySpec("qwen2", layers=4, kv_heads=2), "Q8_0"),
    (TinySpec("qwen2", layers=4, kv_heads=2, tie=True), "Q4_0"),
]


@pytest.fixture(scope="module")
def gguf_pair(tiny_checkpoint, tmp_path_factory):
    made = {}

    def make(spec, qtype):
        key = (repr(spec), qtype)
        if key not in made:
            from transformers import AutoModelForCausalLM

            _, model = tiny_checkpoint(spec)
            folder = tmp_path_factory.mktemp("gguf")
            write_gguf(model, str(folder / "m.gguf"), qtype)
            ref = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="m.gguf").eval()
            made[key] = (str(folder / "m.gguf"), ref)
        return made[key]

    return make


@pytest.mark.parametrize("spec, qtype", CASES, ids=[f"{s.name}-{q}" for s, q in CASES])
def test_gguf_matches_transformers_reading_the_same_file(gguf_pair, spec, qtype):
    path, ref = gguf_pair(spec, qtype)
    config = load_config(path)
    assert (config.num_kv_heads, config.tie_word_embeddings, config.qkv_bias) == (
        spec.kv_heads,
        spec.tie,
        spec.arch == "qwen2",
    )
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    for ranges in ([(0, 4)], [(0, 1), (1, 3), (3, 4)]):
        pipe = LocalPipeline.load(path, ranges, torch.float32)  # the exact mode
        assert (pipe.forward(ids) - expected).abs().max().item() <= 1e-4
    prompt = ids[0, :6].tolist()
    assert list(pipe.generate(prompt, 20)) == hf_greedy(ref, prompt, 20)


def test_permutation_is_undone(gguf_pair):
    """Without undoing llama.cpp's Q/K permutation the logits would be wrong: check the guard does something."""
    path, ref = gguf_pair(*CASES[0])
    import layerline.gguf_model as gm

    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    saved = gm.PERMUTED_ARCHITECTURES
    gm.PERMUTED_ARCHITECTURES = set()
    try:
        wrong = LocalPipeline.load(path, [(0, 4)], torch.float32).forward(ids)
    finally:
        gm.PERMUTED_ARCHITECTURES = saved
    assert (wrong - expected).abs().max().item() > 1e-2


def _tiny_gguf(path: str, arch: str, skip: tuple[str, ...] = ()) -> None:
    w = gguf.GGUFWriter(path, arch)
    fields = {
        "block_count": 1,
        "embedding_length": 32,
        "feed_forward_length": 64,
        "attention.head_count": 2,
        "attention.layer_norm_rms_epsilon": 1e-5,
    }
    for k, v in fields.items():
        if k in skip:
            continue
        if isinstance(v, float):
            w.add_float32(f"{arch}.{k}", v)
        else:
            w.add_uint32(f"{arch}.{k}", v)
    w.add_tensor("token_embd.weight", torch.zeros(10, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_architecture_is_named(tmp_path):
    path = str(tmp_path / "falcon.gguf")
    _tiny_gguf(path, "falcon")
    with pytest.raises(UnsupportedModelError, match="'falcon' is not supported"):
        load_stage(path, 0, 1)


def test_gguf_missing_metadata_is_named(tmp_path):
    path = str(tmp_path / "nohidden.gguf")
    _tiny_gguf(path, "llama", skip=("embedding_length",))
    with pytest.raises(CheckpointError, match="llama.embedding_length"):
        load_config(path)


def test_gguf_missing_tensor_is_named(tmp_path):
    path = str(tmp_path / "notensors.gguf")
    _tiny_gguf(path, "llama")
    with pytest.raises(CheckpointError, match=r"missing tensor.*blk\.0|model\.layers\.0"):
        load_stage(path, 0, 1)
    assert os.path.exists(path)
