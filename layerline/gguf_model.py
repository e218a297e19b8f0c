"""GGUF files as Llama-family checkpoints: the model config from GGUF metadata, GGUF tensor names mapped to Hugging
Face names, llama.cpp's Q/K row permutation undone, and dequantization to the stage's dtype.

Only the tensors a stage asks for are dequantized (the file is memory-mapped, so the others are never read).
Dequantization itself lives in `gguf_dequant.py`; this module knows the architectures.
"""

from __future__ import annotations

import re

import torch

from layerline.config import ModelConfig, RopeScaling
from layerline.errors import CheckpointError, UnsupportedModelError
from layerline.gguf_dequant import dequantize, qtype_name
from layerline.gguf_file import GGUFFile, GGUFTensor
from layerline.gguf_tokenizer import end_of_generation
from layerline.quant.tensor import QTensor, quantizable

GGUF_ARCHITECTURES = {  # GGUF general.architecture -> layerline's (llama files with experts are mixtral)
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
}
# llama.cpp's converter permutes the rows of Q and K for these (so its rotary can use adjacent pairs)
PERMUTED_ARCHITECTURES = {"llama", "mistral", "mixtral"}
GEMMA = {"gemma2", "gemma3"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_GEMMA_NAMES = {  # Gemma's four norms: llama.cpp's ffn_norm is the MLP input's, post_attention_norm the attention output's
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_PHI3_NAMES = {"ffn_up.weight": "mlp.gate_up_proj.weight"}  # gate and up fused in ffn_up
_EXPERTS = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1, "ffn_down_exps.weight": 2}  # stacked [experts, ...]
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor of a model of layerline's architecture `arch`, or None for tensors
    layerline does not use (stacked experts: `expert_names`)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if not m:
        return None
    rest = m.group(2)
    names = {**_LAYER_NAMES, **(_GEMMA_NAMES if arch in GEMMA else _PHI3_NAMES if arch == "phi3" else {})}
    if rest in names:
        hf = names[rest]
        if arch == "mixtral" and hf == "mlp.gate.weight":
            hf = "block_sparse_moe.gate.weight"
        return f"model.layers.{m.group(1)}.{hf}"
    return None


def expert_names(gguf_name: str, arch: str, experts: int) -> list[str]:
    """The HF names of each expert's slice of a stacked expert tensor (ffn_gate_exps...), expert 0 first."""
    m = _BLOCK.match(gguf_name)
    if not m or m.group(2) not in _EXPERTS:
        return []
    which = _EXPERTS[m.group(2)]
    if arch == "mixtral":
        prefix, proj = "block_sparse_moe.experts", ("w1", "w3", "w2")[which]
    else:
        prefix, proj = "mlp.experts", ("gate_proj", "up_proj", "down_proj")[which]
    return [f"model.layers.{m.group(1)}.{prefix}.{e}.{proj}.weight" for e in range(experts)]


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    arch = g.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{g.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    for name, what in (
        ("rope_freqs.weight", "per-dimension rope frequency factors (rope_freqs)"),
        ("rope_factors_long.weight", "phi3's long-context rope factors (longrope)"),
    ):
        if name in g.tensors:
            raise UnsupportedModelError(f"{g.path}: GGUF {what} are not supported")

    def key(name: str, default: object = KeyError) -> object:
        v = g.get(f"{arch}.{name}", default)
        if v is KeyError:
            raise CheckpointError(f"{g.path}: GGUF metadata lacks {arch}.{name}")
        return v

    ours = GGUF_ARCHITECTURES[arch]
    experts = int(key("expert_count", 0) or 0)
    if arch == "llama" and experts:
        ours = "mixtral"
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise UnsupportedModelError(f"{g.path}: per-layer KV head counts are not supported")
    scaling = None
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type == "linear":
        scaling = RopeScaling("linear", float(key("rope.scaling.factor")))
    elif scaling_type not in ("none", None):
        raise UnsupportedModelError(f"{g.path}: GGUF rope scaling type {scaling_type!r} is not supported")
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{g.path}: partial rotary ({rope_dim} of {head_dim} dims) is not supported")
    tokens = g.array_length("tokenizer.ggml.tokens")
    embd = g.tensors.get("token_embd.weight")
    vocab = int(key("vocab_size", tokens if tokens else (embd.shape[0] if embd else 0)))
    window = key("attention.sliding_window", None)
    num_layers = int(key("block_count"))
    extra: dict = {}
    windows = (int(window),) * num_layers if window else ()
    if ours in ("qwen3", "qwen3_moe"):
        extra["qk_norm"] = True
    if ours == "phi3":
        extra["fused_projections"] = True
    if experts:
        dense = [i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in g.tensors]
        extra.update(
            num_experts=experts,
            experts_per_token=int(key("expert_used_count")),
            expert_intermediate_size=int(key("expert_feed_forward_length", key("feed_forward_length"))),
            # llama.cpp renormalises mixtral's and qwen3moe's chosen experts, not qwen2moe's, unless the file says
            norm_topk_prob=bool(key("expert_weights_norm", ours != "qwen2_moe")),
            shared_expert_intermediate_size=int(key("expert_shared_feed_forward_length", 0) or 0),
            moe_layers=tuple(i not in dense for i in range(num_layers)),
        )
    if ours in GEMMA:
        # which layers slide: the file's pattern where it has one, else llama.cpp's (every 2nd / 6th layer global)
        pattern = key("attention.sliding_window_pattern", 2 if ours == "gemma2" else 6)
        if isinstance(pattern, list):
            sliding = [bool(p) for p in pattern]
        else:
            sliding = [bool((i + 1) % int(pattern)) for i in range(num_layers)]
        windows = tuple(int(window) if s and window else None for s in sliding) if window else ()
        # the file has no query_pre_attn_scalar: llama.cpp scales by head_dim ** -0.5, and by (hidden / heads) **
        # -0.5 for the 27B models (46 layers of gemma2, 62 of gemma3), as their configs say
        big = num_layers == (46 if ours == "gemma2" else 62)
        cap, final = key("attn_logit_softcapping", None), key("final_logit_softcapping", None)
        extra.update(
            qk_norm=ours == "gemma3",
            norm_offset=True,
            embed_scale=True,
            activation="gelu_tanh",
            sandwich_norms=True,
            attn_softcap=float(cap) if cap else None,
            final_softcap=float(final) if final else None,
            query_scale=(hidden / heads if big else head_dim) ** -0.5,
            local_rope_theta=float(key("rope.freq_base_swa", 10000.0)) if ours == "gemma3" else None,
        )
    return ModelConfig(
        architecture=ours,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in g.tensors,
        qkv_bias="blk.0.attn_q.bias" in g.tensors,
        o_bias="blk.0.attn_output.bias" in g.tensors,
        mlp_bias=False,
        sliding_windows=windows,
        bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(end_of_generation(g)),
        pad_token_id=g.get("tokenizer.ggml.padding_token_id"),
        **extra,
    )


def _expert_slice(t: GGUFTensor, e: int, experts: int) -> GGUFTensor:
    """Expert `e` of a stacked [experts, rows, cols] tensor: its rows x cols, in the file's own blocks."""
    if len(t.shape) != 3 or t.shape[0] != experts or t.n_bytes % experts:
        raise CheckpointError(f"{t.name}: shape {list(t.shape)} is not {experts} stacked experts")
    per = t.n_bytes // experts
    raw = t.raw[e * per : (e + 1) * per]
    return GGUFTensor(f"{t.name}[{e}]", t.qtype, tuple(t.shape[1:]), raw, per, t.offset + e * per)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of Q/K rows: w [n_head * D, ...] (D = 2 * half); per head llama.cpp stores
    the rows as (half, 2) interleaved pairs, the reference model as (2, half) halves."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


class GGUFCheckpoint:
    """A GGUF file opened as a checkpoint: `.config`, `read(names, dtype)` of HF-named tensors."""

    def __init__(self, path: str) -> None:
        self.file = GGUFFile(path)
        self.path = self.file.path
        self.config = c = config_from_gguf(self.file)
        self.bytes_read = 0
        self._by_hf: dict[str, GGUFTensor] = {}  # stacked experts: one slice of the file's tensor per expert
        for name, t in self.file.tensors.items():
            hf = hf_name(name, c.architecture)
            if hf is not None:
                self._by_hf[hf] = t
            for e, expert in enumerate(expert_names(name, c.architecture, c.num_experts)):
                self._by_hf[expert] = _expert_slice(t, e, c.num_experts)

    def __contains__(self, name: str) -> bool:
        return name in self._by_hf

    def source_name(self, name: str) -> str:
        return f"{self._by_hf[name].name if name in self._by_hf else '?'} ({name})"

    def stored_bytes(self, names: list[str]) -> int:
        return sum(self._by_hf[n].n_bytes for n in names)

    def stored_types(self) -> dict[str, str]:
        """HF name -> the GGML type it is stored in ("Q4_K", "F32"...)."""
        return {hf: qtype_name(t.qtype) for hf, t in self._by_hf.items()}

    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.file.tensors.values())

    def read(self, names: list[str], dtype: torch.dtype, quantized: bool = False) -> dict[str, torch.Tensor | QTensor]:
        """HF-named tensors as float tensors of `dtype`; with `quantized`, matmul weights (2-D) as `QTensor`s of
        their stored blocks instead (norms and biases stay float)."""
        c = self.config
        permute = c.architecture in PERMUTED_ARCHITECTURES
        out: dict[str, torch.Tensor | QTensor] = {}
        for hf in names:
            t = self._by_hf[hf]
            if quantized and quantizable(hf, t.shape):
                q = QTensor.from_raw(t.qtype, t.shape, self.file.read_bytes(t), name=t.name)
                self.bytes_read += t.n_bytes
                if permute and ".self_attn.q_proj." in hf:
                    q = q.permute_rows(unpermute_rows(torch.arange(q.shape[0]), c.num_heads))
                elif permute and ".self_attn.k_proj." in hf:
                    q = q.permute_rows(unpermute_rows(torch.arange(q.shape[0]), c.num_kv_heads))
                out[hf] = q
                continue
            # dequantize in float32, cast after undoing the permutation
            w = dequantize(t.raw, t.qtype, t.shape, torch.float32, name=t.name)
            self.bytes_read += t.n_bytes
            if permute and ".self_attn.q_proj." in hf:
                w = unpermute_rows(w, c.num_heads)
            elif permute and ".self_attn.k_proj." in hf:
                w = unpermute_rows(w, c.num_kv_heads)
            if c.norm_offset and hf.endswith("norm.weight"):  # llama.cpp stores Gemma's norms as 1 + w
                w = w - 1
            if hf.endswith("shared_expert_gate.weight"):
                w = w.reshape(1, -1)  # stored as a vector
            out[hf] = w.to(dtype)
        return out

    def close(self) -> None:
        self.file = None  # type: ignore[assignment]  # drops the memory map
