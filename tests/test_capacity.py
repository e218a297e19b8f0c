"""Stage capacity measured with the model's real layer shapes (stage_server/capacity.py): plausible numbers that
grow with the shapes, an on-disk cache keyed by model/device/dtype/threads/quota, re-measuring on request or when
an entry is damaged, and the OS figures (free memory, CPU quota)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

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


def _flops(fn, min_time, min_runs, sync) -> float:
    """A cost model instead of a clock: the floating-point operations of one call, as "seconds" (1 TFLOP/s)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() * 1e-12


def test_measured_times_are_positive():
    c = measure(config(64, 128), min_time=0.05)
    assert c.decode_s_per_layer > 0 and c.decode_s_fixed >= 0 and c.head_decode_s >= 0
    assert c.prefill_s_per_layer_token > 0 and c.seconds > 0
    assert c.dtype == "float32" and c.device == "cpu" and c.threads == torch.get_num_threads()


def test_the_figures_follow_the_cost_of_the_layer_shapes():
    """What measure derives from its timings (per layer from two layer counts, the LM head over a middle stage,
    prefill per token), with the work itself as the clock: independent of how busy the machine is."""
    small = measure(config(64, 128), timer=_flops)
    big = measure(config(1024, 4096, vocab=64000), timer=_flops)
    # a 1024-wide layer has ~500x the weights of a 64-wide one
    assert big.decode_s_per_layer > 100 * small.decode_s_per_layer > 0
    assert big.prefill_s_per_layer_token > 100 * small.prefill_s_per_layer_token > 0
    # the 64000-word LM head holds ~4 such layers' weights
    assert 2 * big.decode_s_per_layer < big.head_decode_s < 10 * big.decode_s_per_layer
    # a decode step over one layer: its matmuls, 2 flops per weight (q, k, v, o, gate, up, down), and attention
    # over the 128 positions of context
    kv = 2 * 1024 // 8  # 2 key-value heads of 8 heads' width
    weights = 1024 * (1024 + 2 * kv + 1024) + 3 * 1024 * 4096
    assert big.decode_s_per_layer * 1e12 == pytest.approx(2 * weights, rel=0.2)


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
