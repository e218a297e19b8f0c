"""Stage capacity measured with the model's real layer shapes (stage_server/capacity.py): plausible numbers that
grow with the shapes, an on-disk cache keyed by model/device/dtype/threads/quota, re-measuring on request or when
an entry is damaged, and the OS figures (free memory, CPU quota)."""

from __future__ import annotations

import os

import torch

from layerline.config import ModelConfig
from layerline.quant import from_name
from layerline.quant.layout import layer_types
from layerline.stage_server.capacity import Capacity, _random_stage, cached_capacity, cpu_quota, free_memory, measure


def config(hidden: int, intermediate: int, layers: int = 6, vocab: int = 1000) -> ModelConfig:
    return ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "vocab_size": vocab,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        }
    )


def test_measured_times_are_positive_and_grow_with_the_layer_shapes():
    small = measure(config(64, 128), min_time=0.05)
    big = measure(config(1024, 4096, vocab=64000), min_time=0.1)
    for c in (small, big):
        assert c.decode_s_per_layer > 0 and c.decode_s_fixed >= 0 and c.head_decode_s >= 0
        assert c.prefill_s_per_layer_token > 0 and c.seconds > 0
        assert c.dtype == "float32" and c.device == "cpu" and c.threads == torch.get_num_threads()
    # a 1024-wide layer has ~500x the weights of a 64-wide one; the time must reflect some of that, and the 64000
    # word LM head (~4 such layers of weights) costs more than one layer even on a noisy machine
    assert big.decode_s_per_layer > 3 * small.decode_s_per_layer
    assert big.prefill_s_per_layer_token > 3 * small.prefill_s_per_layer_token
    assert big.head_decode_s > big.decode_s_per_layer


def test_capacity_is_cached_on_disk_and_remeasured_on_request(tmp_path):
    cfg = config(64, 128)
    first, cached = cached_capacity(cfg, "fp-a", cache_dir=str(tmp_path), min_time=0.02)
    assert not cached
    again, cached = cached_capacity(cfg, "fp-a", cache_dir=str(tmp_path), min_time=0.02)
    assert cached and again == first
    fresh, cached = cached_capacity(cfg, "fp-a", cache_dir=str(tmp_path), remeasure=True, min_time=0.02)
    assert not cached and fresh.measured_at >= first.measured_at
    # another model, dtype or thread count is another entry
    _, cached = cached_capacity(cfg, "fp-b", cache_dir=str(tmp_path), min_time=0.02)
    assert not cached
    _, cached = cached_capacity(cfg, "fp-a", torch.bfloat16, cache_dir=str(tmp_path), min_time=0.02)
    assert not cached
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        _, cached = cached_capacity(cfg, "fp-a", cache_dir=str(tmp_path), min_time=0.02)
        assert not cached
    finally:
        torch.set_num_threads(threads)
    # a damaged entry is measured again, not trusted
    for name in os.listdir(tmp_path):
        (tmp_path / name).write_text("{not json")
    _, cached = cached_capacity(cfg, "fp-a", cache_dir=str(tmp_path), min_time=0.02)
    assert not cached
    assert Capacity.from_json('{"format": 0}') is None


def test_os_figures():
    free, total = free_memory("cpu")
    assert 0 < free <= total
    quota = cpu_quota()
    assert quota is None or quota > 0


def test_quantized_stages_are_timed_on_blocks_of_their_types(tmp_path):
    """A stage that will hold a GGUF file's Q4_K / Q6_K blocks (or --quantize's) is timed on layers of those very
    types, and its measurement is cached apart from the float one."""
    cfg = config(256, 512, vocab=512)
    stored = {}
    for i in range(cfg.num_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            stored[f"model.layers.{i}.{name}.weight"] = "Q4_K"
        stored[f"model.layers.{i}.self_attn.v_proj.weight"] = "Q6_K"
        stored[f"model.layers.{i}.mlp.down_proj.weight"] = "Q6_K"
    stored["model.embed_tokens.weight"] = stored["lm_head.weight"] = "Q8_0"
    c = measure(cfg, from_name("stored"), stored=stored, min_time=0.02)
    assert (c.weights, c.weight_types, c.dtype) == ("stored", "Q4_K,Q6_K", "float32")
    assert c.decode_s_per_layer > 0 and c.head_decode_s >= 0
    assert measure(cfg, from_name("int4"), min_time=0.02).weight_types == "Q4_1"
    stage = _random_stage(cfg, 1, 3, torch.float32, "cpu", layer_types(cfg, from_name("stored"), stored))
    summary = stage.weight_summary()
    assert stage.quantized and summary.startswith("quantized: Q4_K ") and ", Q6_K " in summary
    _, cached = cached_capacity(cfg, "fp-q", cache_dir=str(tmp_path), min_time=0.02)
    assert not cached
    _, cached = cached_capacity(cfg, "fp-q", from_name("stored"), stored=stored, cache_dir=str(tmp_path), min_time=0.02)
    assert not cached  # another entry than the float one
    _, cached = cached_capacity(cfg, "fp-q", from_name("stored"), stored=stored, cache_dir=str(tmp_path), min_time=0.02)
    assert cached
