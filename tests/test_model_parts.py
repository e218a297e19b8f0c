"""The model's small pieces against transformers' own functions: rotary tables and their application, RMSNorm in
every dtype, and the chunked LM head (several chunks, the last padded) with the tied embedding read from it."""

from __future__ import annotations

import pytest
import torch

from layerline.config import ModelConfig, RopeScaling
from layerline.model import HEAD_CHUNK, RMSNorm, chunk_head, embed_from_head, head_logits
from layerline.rope import RotaryTable, apply_rotary


def _config(**kw) -> ModelConfig:
    base = dict(
        architecture="llama",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "scaling",
    [None, RopeScaling("linear", 4.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 64)],
    ids=["default", "linear", "llama3"],
)
def test_rotary_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if scaling is not None and scaling.rope_type == "linear":
        rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    elif scaling is not None:
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        }
    hf = LlamaRotaryEmbedding(
        LlamaConfig(
            hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=rope, max_position_embeddings=512
        )
    )
    positions = torch.tensor([[0, 5, 77, 300], [3, 2, 1, 0]])
    q, k = torch.randn(2, 4, 4, 16), torch.randn(2, 2, 4, 16)
    cos_ref, sin_ref = hf(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    table = RotaryTable(_config(rope_scaling=scaling))
    cos, sin = table.lookup(positions, torch.float32, top=301)
    assert torch.equal(cos[:, 0], cos_ref)
    assert torch.equal(apply_rotary(q, cos, sin), q_ref)
    assert torch.equal(apply_rotary(k, cos, sin), k_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(64))
    ref = ref.to(dtype)
    ours = RMSNorm(ref.weight.detach().clone(), 1e-5)
    x = (torch.randn(3, 5, 64) * 4).to(dtype)
    assert torch.equal(ours(x), ref(x))


def test_chunked_head_with_padding_and_tied_embedding():
    vocab, hidden = 2 * HEAD_CHUNK + 123, 16
    w = torch.randn(vocab, hidden)
    chunks = chunk_head(w)
    assert chunks.shape == (3, hidden, HEAD_CHUNK)
    h = torch.randn(2, 3, hidden)
    expected = h @ w.t()
    assert torch.allclose(head_logits(h, chunks, vocab), expected, atol=1e-4)
    ids = torch.tensor([[0, HEAD_CHUNK - 1, HEAD_CHUNK, vocab - 1]])
    assert torch.equal(embed_from_head(ids, chunks), w[ids])
