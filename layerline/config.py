"""Model configuration: one typed dataclass for every supported Llama-family model, built from a Hugging Face
`config.json` dict (GGUF metadata is translated in `gguf_model.py`).

Anything the model code does not implement (another architecture, activation, RoPE variant, partial rotary, ...)
is refused here with an `UnsupportedModelError` that names the option, so a checkpoint is either run exactly or
not at all. This module knows nothing of tensors or files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

from layerline.errors import CheckpointError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "linear" or "llama3"
    factor: float  # positions are divided by this (linear) / long wavelengths stretched by it (llama3)
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" (incl. SmolLM/SmolLM2), "mistral" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # LM head shares the token embedding
    qkv_bias: bool = False  # q/k/v projections have a bias (always for qwen2; `attention_bias` for llama)
    o_bias: bool = False  # output projection has a bias (llama `attention_bias`)
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer: attend to the last W positions only, or None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"model architecture {self.architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                raise CheckpointError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"model config: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise CheckpointError(f"model config: head_dim must be a positive even number, got {self.head_dim}")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise CheckpointError("model config: one sliding window entry per layer expected")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def kv_bytes_per_token(self, num_layers: int, itemsize: int) -> int:
        """K and V bytes one token occupies in the cache of `num_layers` layers."""
        return 2 * num_layers * self.kv_size * itemsize

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return config_from_hf_dict(d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"config.json not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        try:
            return config_from_hf_dict(d)
        except CheckpointError as e:
            raise type(e)(f"{path}: {e}") from None


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either the transformers>=5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` fields."""
    params = d.get("rope_parameters")
    if (
        isinstance(params, dict)
        and "rope_theta" not in params
        and params
        and all(isinstance(v, dict) for v in params.values())
    ):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    scaling = dict(params) if isinstance(params, dict) else dict(d.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    prf = float(scaling.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
    if prf != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={prf} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
    if "factor" not in scaling:
        raise CheckpointError(f"rope scaling {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    return theta, RopeScaling(
        "llama3",
        float(scaling["factor"]),
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
        int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _sliding_windows(d: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    layer_types = d.get("layer_types")
    if arch == "qwen2":
        if layer_types is None:
            use = bool(d.get("use_sliding_window", False))
            max_window_layers = int(d.get("max_window_layers", num_layers))
            layer_types = [
                "sliding_attention" if use and window and i >= max_window_layers else "full_attention"
                for i in range(num_layers)
            ]
    elif layer_types is None:
        layer_types = ["sliding_attention" if window else "full_attention"] * num_layers
    if len(layer_types) != num_layers:
        raise CheckpointError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    out: list[int | None] = []
    for t in layer_types:
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention":
            if not window or int(window) <= 0:
                raise CheckpointError("a sliding_attention layer needs a positive sliding_window")
            out.append(int(window))
        else:
            raise UnsupportedModelError(f"attention layer type {t!r} is not supported")
    return tuple(out) if any(w is not None for w in out) else ()


def _int_list(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def config_from_hf_dict(d: dict[str, Any]) -> ModelConfig:
    arch = d.get("model_type")
    if arch is None:
        raise CheckpointError("config has no 'model_type'")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
    if int(d.get("pretraining_tp", 1) or 1) != 1:
        raise UnsupportedModelError("pretraining_tp != 1 is not supported")
    if d.get("quantization_config"):
        qm = d["quantization_config"].get("quant_method", "?")
        raise UnsupportedModelError(f"quantized HF checkpoints ({qm}) are not supported; use float weights or GGUF")
    try:
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        num_layers = int(d["num_hidden_layers"])
        theta, scaling = _rope_from_hf(d)
        attention_bias = bool(d.get("attention_bias", False))
        return ModelConfig(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else attention_bias,
            o_bias=False if arch == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if arch == "llama" else False,
            sliding_windows=_sliding_windows(d, arch, num_layers),
            bos_token_id=None if d.get("bos_token_id") is None else int(d["bos_token_id"]),
            eos_token_ids=_int_list(d.get("eos_token_id")),
            pad_token_id=None if d.get("pad_token_id") is None else int(d["pad_token_id"]),
        )
    except KeyError as e:
        raise CheckpointError(f"config lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config has a field of the wrong type: {e}") from None


def config_to_json(config: ModelConfig) -> str:
    """layerline's own form of a config (what a coordinator sends a stage host); `config_from_json` reads it."""
    return json.dumps(asdict(config), sort_keys=True)


def config_from_json(text: str) -> ModelConfig:
    """The inverse of `config_to_json`; anything else is a CheckpointError naming the problem."""
    try:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise TypeError("expected a JSON object")
        fields = {f.name for f in dataclass_fields(ModelConfig)}
        unknown = set(d) - fields
        if unknown:
            raise TypeError(f"unknown field(s) {', '.join(sorted(unknown))[:200]}")
        rope = d.get("rope_scaling")
        d["rope_scaling"] = RopeScaling(**rope) if rope is not None else None
        d["sliding_windows"] = tuple(None if w is None else int(w) for w in d.get("sliding_windows", ()))
        d["eos_token_ids"] = tuple(int(t) for t in d.get("eos_token_ids", ()))
        return ModelConfig(**d)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"not a layerline model config ({type(e).__name__}: {e})") from None


def model_fingerprint(config: ModelConfig) -> str:
    """Stages of one pipeline must serve the same model: a hash of its config."""
    text = json.dumps(asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
