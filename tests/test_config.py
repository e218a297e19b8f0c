"""Config parsing: the fields of every supported family, both rope formats, and a clear refusal of anything the
model code does not implement."""

from __future__ import annotations

import re

import pytest

from layerline.config import ModelConfig, config_from_json, config_to_json, model_fingerprint
from layerline.errors import CheckpointError, UnsupportedModelError

BASE = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
}


def cfg(**kw):
    return ModelConfig.from_hf_dict({**BASE, **kw})


def test_llama_fields():
    c = cfg(eos_token_id=[2, 3], bos_token_id=1, tie_word_embeddings=True, rope_theta=5e5)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.q_size, c.kv_size) == (4, 2, 16, 64, 32)
    assert c.eos_token_ids == (2, 3) and c.bos_token_id == 1 and c.tie_word_embeddings
    assert c.rope_theta == 5e5 and c.rope_scaling is None and not c.qkv_bias
    assert c.kv_bytes_per_token(num_layers=2, itemsize=4) == 2 * 2 * 32 * 4


def test_rope_formats_old_and_new():
    old = cfg(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0})
    new = cfg(rope_parameters={"rope_theta": 500000.0, "rope_type": "linear", "factor": 4.0})
    assert old.rope_scaling == new.rope_scaling and old.rope_theta == new.rope_theta == 500000.0
    l3 = cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192})
    assert l3.rope_scaling.rope_type == "llama3" and l3.rope_scaling.high_freq_factor == 4.0


def test_qwen2_has_qkv_bias_and_sliding_layers():
    q = cfg(model_type="qwen2")
    assert q.qkv_bias and not q.o_bias and q.sliding_windows == ()
    q = cfg(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert q.sliding_windows == (None, 16)
    m = cfg(model_type="mistral", sliding_window=4096)
    assert m.sliding_windows == (4096, 4096)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "gpt2"}, "'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "'dynamic' is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"quantization_config": {"quant_method": "awq"}}, "awq"),
        ({"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
    ],
)
def test_unsupported_options_are_named(change, words):
    with pytest.raises(UnsupportedModelError, match=words):
        cfg(**change)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_attention_heads": 3}, "not a multiple"),
        ({"hidden_size": "sixty-four"}, "wrong type"),
        ({"vocab_size": 0}, "vocab_size must be positive"),
    ],
)
def test_bad_values_are_checkpoint_errors(change, words):
    with pytest.raises(CheckpointError, match=words):
        cfg(**change)


def test_missing_field_is_named():
    d = dict(BASE)
    del d["hidden_size"]
    with pytest.raises(CheckpointError, match="'hidden_size'"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    "config",
    [
        cfg(eos_token_id=[2, 3], bos_token_id=1, tie_word_embeddings=True),
        cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}),
        cfg(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1),
        cfg(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0}, pad_token_id=0),
    ],
)
def test_layerline_json_round_trip_keeps_the_fingerprint(config):
    again = config_from_json(config_to_json(config))
    assert again == config and model_fingerprint(again) == model_fingerprint(config)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[1, 2]", "expected a JSON object"),
        ("{", "JSONDecodeError"),
        ('{"architecture": "llama", "evil": 1}', "unknown field(s) evil"),
        ('{"architecture": "llama"}', "missing"),
    ],
)
def test_bad_layerline_json_is_a_checkpoint_error(text, words):
    with pytest.raises(CheckpointError, match=re.escape(words)):
        config_from_json(text)
