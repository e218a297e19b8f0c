"""Model configuration: one typed dataclass for every supported decoder model (Llama and the families that differ
from it by a few options: per-head q/k norms, fused projections, mixture-of-experts MLPs), built from a Hugging Face
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

SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)
GEMMA_FAMILY = ("gemma2", "gemma3")
ARCH_OF_MODEL_TYPE = {"gemma3_text": "gemma3"}  # HF model_type -> layerline's name
QWEN_FAMILY = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # max_window_layers / use_sliding_window
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
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
    architecture: str  # one of SUPPORTED_ARCHITECTURES ("llama" includes SmolLM/SmolLM2)
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
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (qwen3, qwen3_moe)
    fused_projections: bool = False  # the checkpoint stores qkv_proj and gate_up_proj fused (phi3)
    # mixture of experts: 0 experts = a dense model
    num_experts: int = 0
    experts_per_token: int = 0  # the router's top-k
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = False  # the chosen experts' router probabilities renormalised to sum to 1
    shared_expert_intermediate_size: int = 0  # qwen2_moe: an expert every token goes through, with a sigmoid gate
    moe_layers: tuple[bool, ...] = ()  # per layer: a sparse MoE MLP (else a dense MLP of intermediate_size)
    # the Gemma family's differences
    norm_offset: bool = False  # RMSNorm scales by (1 + w), in float32
    embed_scale: bool = False  # token embeddings times sqrt(hidden_size)
    activation: str = "silu"  # the gated MLP's: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    sandwich_norms: bool = False  # a norm after attention and one after the MLP too (pre_/post_feedforward)
    attn_softcap: float | None = None  # attention scores: cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits likewise
    query_scale: float | None = None  # attention scores' scale (None: head_dim ** -0.5)
    local_rope_theta: float | None = None  # sliding layers' rotary base, without scaling (gemma3)

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
        if self.num_experts:
            if not 0 < self.experts_per_token <= self.num_experts or self.expert_intermediate_size <= 0:
                raise CheckpointError(
                    f"model config: {self.experts_per_token} experts per token of {self.num_experts} "
                    f"(intermediate size {self.expert_intermediate_size}) is not a mixture of experts"
                )
            if len(self.moe_layers) != self.num_layers:
                raise CheckpointError("model config: one moe_layers entry per layer expected")

    def is_moe(self, layer: int) -> bool:
        """Layer `layer` has a sparse mixture-of-experts MLP."""
        return bool(self.moe_layers and self.moe_layers[layer])

    def moe_summary(self) -> str:
        """For a mixture of experts: what a sparse layer holds (every expert) against what it computes per token
        (its top-k experts); "" for a dense model. Memory is planned on the first, capacity timed on the second."""
        if not self.num_experts:
            return ""
        expert = 3 * self.hidden_size * self.expert_intermediate_size
        shared = 3 * self.hidden_size * self.shared_expert_intermediate_size
        router = self.num_experts * self.hidden_size + (self.hidden_size if shared else 0)
        held = self.num_experts * expert + shared + router
        active = self.experts_per_token * expert + shared + router
        return (
            f"mixture of experts: {sum(self.moe_layers)} of {self.num_layers} layers sparse, {self.num_experts} "
            f"experts{' + a shared one' if shared else ''}, top-{self.experts_per_token} per token: a sparse layer's "
            f"MLP holds {held / 1e6:.2f} M parameters (every expert, counted in memory and placement) and computes "
            f"with {active / 1e6:.2f} M per token (what its measured speed reflects)"
        )

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


def _rope_from_hf(d: dict[str, Any], arch: str = "") -> tuple[float, RopeScaling | None, float | None]:
    """rope_theta, scaling and (gemma3) the sliding layers' own base, from either the transformers>=5
    `rope_parameters` or the older `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`) fields."""
    params = d.get("rope_parameters")
    if (
        isinstance(params, dict)
        and "rope_theta" not in params
        and params
        and all(isinstance(v, dict) for v in params.values())
    ):
        if arch != "gemma3" or set(params) - {"full_attention", "sliding_attention"}:
            raise UnsupportedModelError(
                f"per-layer-type rope_parameters ({', '.join(sorted(params))}) are not supported for {arch}"
            )
        local = dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"rope type {local['rope_type']!r} on sliding layers is not supported")
        theta, scaling, _ = _rope_from_hf({"rope_parameters": params.get("full_attention") or {}})
        return theta, scaling, float(local.get("rope_theta", 10000.0))
    local_theta = float(d["rope_local_base_freq"]) if arch == "gemma3" and "rope_local_base_freq" in d else None
    theta, scaling = _rope_one(params, d)
    return theta, scaling, local_theta


def _rope_one(params: Any, d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
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
    if arch in QWEN_FAMILY:
        if layer_types is None:
            use = bool(d.get("use_sliding_window", False))
            max_window_layers = int(d.get("max_window_layers", num_layers))
            layer_types = [
                "sliding_attention" if use and window and i >= max_window_layers else "full_attention"
                for i in range(num_layers)
            ]
    elif layer_types is None and arch in GEMMA_FAMILY:  # every `pattern`-th layer global, the others sliding
        pattern = int(
            d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or (2 if arch == "gemma2" else 6)
        )
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
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


def _gemma(d: dict[str, Any], arch: str, hidden: int, local_theta: float | None) -> dict[str, Any]:
    """The Gemma family's fields of ModelConfig (nothing for the others)."""
    if arch not in GEMMA_FAMILY:
        return {}
    scalar = d.get("query_pre_attn_scalar")
    cap = d.get("attn_logit_softcapping")
    final = d.get("final_logit_softcapping")
    return dict(
        norm_offset=True,
        embed_scale=True,
        activation="gelu_tanh",
        sandwich_norms=True,
        attn_softcap=float(cap) if cap else None,
        final_softcap=float(final) if final else None,
        query_scale=float(scalar) ** -0.5 if scalar else None,
        local_rope_theta=local_theta if arch == "gemma3" else None,
    )


def _experts(d: dict[str, Any], arch: str, num_layers: int) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelConfig from a HF config (nothing for a dense architecture)."""
    if arch not in MOE_ARCHITECTURES:
        return {}
    if arch == "mixtral":  # every layer sparse, the chosen experts' weights always renormalised
        experts = int(d["num_local_experts"])
        return dict(
            num_experts=experts,
            experts_per_token=int(d.get("num_experts_per_tok", 2)),
            expert_intermediate_size=int(d["intermediate_size"]),
            norm_topk_prob=True,
            moe_layers=(True,) * num_layers,
        )
    experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)
    step = int(d.get("decoder_sparse_step", 1) or 1)
    dense = set(_int_list(d.get("mlp_only_layers")))
    layers = tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    if not any(layers):
        return {}
    return dict(
        num_experts=experts,
        experts_per_token=int(d.get("num_experts_per_tok", 1)),
        expert_intermediate_size=int(d["moe_intermediate_size"]),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size", 0) or 0)
        if arch == "qwen2_moe"
        else 0,
        moe_layers=layers,
    )


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
    if arch == "gemma3" and ("vision_config" in d or "text_config" in d):
        raise UnsupportedModelError(
            "gemma3 with a vision tower (vision_config) is not supported: serve its text model (gemma3_text)"
        )
    arch = ARCH_OF_MODEL_TYPE.get(arch, arch)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    gemma = arch in GEMMA_FAMILY
    act = (
        (d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh")
        if gemma
        else d.get("hidden_act", "silu")
    )
    wanted = "gelu_pytorch_tanh" if gemma else "silu"
    if act != wanted:
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported for {arch} (only {wanted!r})")
    if int(d.get("pretraining_tp", 1) or 1) != 1:
        raise UnsupportedModelError("pretraining_tp != 1 is not supported")
    if d.get("quantization_config"):
        qm = d["quantization_config"].get("quant_method", "?")
        raise UnsupportedModelError(f"quantized HF checkpoints ({qm}) are not supported; use float weights or GGUF")
    try:
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        num_layers = int(d["num_hidden_layers"])
        theta, scaling, local_theta = _rope_from_hf(d, arch)
        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = {"qwen2": True, "qwen2_moe": bool(d.get("qkv_bias", True))}.get(arch, attention_bias)
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
            qkv_bias=qkv_bias,
            o_bias=False if arch in ("qwen2", "qwen2_moe") else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if arch == "llama" else False,
            sliding_windows=_sliding_windows(d, arch, num_layers),
            bos_token_id=None if d.get("bos_token_id") is None else int(d["bos_token_id"]),
            eos_token_ids=_int_list(d.get("eos_token_id")),
            pad_token_id=None if d.get("pad_token_id") is None else int(d["pad_token_id"]),
            qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3"),
            fused_projections=arch == "phi3",
            **_experts(d, arch, num_layers),
            **_gemma(d, arch, hidden, local_theta),
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
        d["moe_layers"] = tuple(bool(x) for x in d.get("moe_layers", ()))
        return ModelConfig(**d)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"not a layerline model config ({type(e).__name__}: {e})") from None


def model_fingerprint(config: ModelConfig) -> str:
    """Stages of one pipeline must serve the same model: a hash of its config."""
    text = json.dumps(asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
