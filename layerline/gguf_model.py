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
from layerline.gguf_file import GGUFFile
from layerline.quant.tensor import QTensor

GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# llama.cpp's converter permutes the rows of Q and K for these (so its rotary can use adjacent pairs)
PERMUTED_ARCHITECTURES = {"llama", "mistral"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors layerline does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def gguf_name(hf: str) -> str:
    """The GGUF name of a Hugging Face tensor name (the inverse of `hf_name`)."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}"
    return hf


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    arch = g.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{g.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    if "rope_freqs.weight" in g.tensors:
        raise UnsupportedModelError(
            f"{g.path}: GGUF per-dimension rope frequency factors (rope_freqs) are not supported"
        )

    def key(name: str, default: object = KeyError) -> object:
        v = g.get(f"{arch}.{name}", default)
        if v is KeyError:
            raise CheckpointError(f"{g.path}: GGUF metadata lacks {arch}.{name}")
        return v

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
    eos = g.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
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
        sliding_windows=(int(window),) * num_layers if window else (),
        bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=g.get("tokenizer.ggml.padding_token_id"),
    )


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
        self.config = config_from_gguf(self.file)
        self.bytes_read = 0
        self._by_hf: dict[str, str] = {}
        for name in self.file.tensors:
            hf = hf_name(name)
            if hf is not None:
                self._by_hf[hf] = name

    def __contains__(self, name: str) -> bool:
        return name in self._by_hf

    def source_name(self, name: str) -> str:
        return f"{gguf_name(name)} ({name})"

    def stored_bytes(self, names: list[str]) -> int:
        return sum(self.file.tensors[self._by_hf[n]].n_bytes for n in names)

    def stored_types(self) -> dict[str, str]:
        """HF name -> the GGML type it is stored in ("Q4_K", "F32"...)."""
        return {hf: qtype_name(self.file.tensors[g].qtype) for hf, g in self._by_hf.items()}

    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.file.tensors.values())

    def read(self, names: list[str], dtype: torch.dtype, quantized: bool = False) -> dict[str, torch.Tensor | QTensor]:
        """HF-named tensors as float tensors of `dtype`; with `quantized`, matmul weights (2-D) as `QTensor`s of
        their stored blocks instead (norms and biases stay float)."""
        c = self.config
        permute = c.architecture in PERMUTED_ARCHITECTURES
        out: dict[str, torch.Tensor | QTensor] = {}
        for hf in names:
            t = self.file.tensors[self._by_hf[hf]]
            if quantized and len(t.shape) == 2:
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
            out[hf] = w.to(dtype)
        return out

    def close(self) -> None:
        self.file = None  # type: ignore[assignment]  # drops the memory map
