"""Tiny random checkpoints made on the fly for the tests: Hugging Face folders written by transformers'
`save_pretrained` (llama, mistral, qwen2, qwen3, phi3, mixtral, qwen2_moe, qwen3_moe; tied/untied; sharded), a tiny byte-level tokenizer, and GGUF files
written with the `gguf` package the way llama.cpp's converter writes them (Q/K rows permuted)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

VOCAB = 320  # 256 byte tokens + merges + specials fit in here


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    layers: int = 6
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 96
    vocab: int = VOCAB
    tie: bool = False
    shard_bytes: int | None = None  # save sharded with this max shard size
    extra: tuple = ()  # extra config fields as (key, value) pairs

    @property
    def name(self) -> str:
        parts = [self.arch, f"L{self.layers}", "gqa" if self.kv_heads < self.heads else "mha"]
        parts.append("tied" if self.tie else "untied")
        if self.shard_bytes:
            parts.append("sharded")
        parts += [str(k) for k, _ in self.extra]
        return "-".join(parts)


def hf_model(spec: TinySpec, seed: int = 0):
    """A transformers model with random weights large enough that greedy choices are not near ties."""
    import transformers

    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[spec.arch]
    head_dim = spec.hidden // spec.heads
    family = {  # sizes a tiny model of the family needs beyond the common ones (each family's defaults are big)
        "qwen3": dict(head_dim=head_dim),
        "gemma2": dict(head_dim=head_dim, sliding_window=6),
        "gemma3": dict(head_dim=head_dim, sliding_window=6),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
        ),
        "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=head_dim),
    }.get(spec.arch, {})
    config = cls_config(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=spec.tie,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **{**family, **dict(spec.extra)},
    )
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "embed" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def save_hf(spec: TinySpec, folder: str, seed: int = 0):
    model = hf_model(spec, seed)
    kwargs = {"max_shard_size": spec.shard_bytes} if spec.shard_bytes else {}
    model.save_pretrained(folder, **kwargs)
    save_tokenizer(folder)
    return model


def byte_tokenizer():
    """A byte-level BPE tokenizer with a few merges and two chat tokens, ids < VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["the capital of france is paris", "hello world, this is a tiny model", "numbers 0123456789"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_tokenizer(folder: str) -> None:
    byte_tokenizer().save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            f,
        )


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permutation of Q/K rows (the inverse of what layerline undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_ARCH = {  # HF model_type -> the architecture llama.cpp's converter writes
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}


def write_gguf(model, path: str, qtype_name: str = "F32") -> None:
    """Write a transformers model of any family layerline serves as a GGUF file in llama.cpp's layout (names,
    metadata, Q/K rows permuted for llama, experts stacked, Gemma's norms as 1 + w), 2-D weights in `qtype_name`
    (F32, F16, Q8_0, ...)."""
    import gguf

    c = model.config
    arch = GGUF_ARCH[c.model_type]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if getattr(c, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
        if arch == "qwen3moe":
            w.add_expert_weights_norm(bool(c.norm_topk_prob))
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    tok = byte_tokenizer()
    vocab = tok.get_vocab()
    tokens = [""] * c.vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    for i in range(len(vocab), c.vocab_size):
        tokens[i] = f"[PAD{i}]"
    types = [gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(c.vocab_size)]
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_pad_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    qtype = gguf.GGMLQuantizationType[qtype_name]
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    gemma = arch in ("gemma2", "gemma3")
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.qkv_proj.weight": "attn_qkv.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight" if gemma else "ffn_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.gate_up_proj.weight": "ffn_up.weight",  # phi3: gate and up fused in ffn_up
        "mlp.down_proj.weight": "ffn_down.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    }
    tensors = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        if name.startswith("model.layers."):
            idx, rest = name[len("model.layers.") :].split(".", 1)
            if rest == "mlp.experts.gate_up_proj":  # [experts, 2 x inner, hidden]: stacked as llama.cpp does
                half = a.shape[1] // 2
                tensors += [
                    (f"blk.{idx}.ffn_gate_exps.weight", a[:, :half]),
                    (f"blk.{idx}.ffn_up_exps.weight", a[:, half:]),
                ]
                continue
            if rest == "mlp.experts.down_proj":
                tensors.append((f"blk.{idx}.ffn_down_exps.weight", a))
                continue
            gname = f"blk.{idx}.{per_layer[rest]}"
        else:
            gname = names[name]
        if arch == "llama" and rest_is(name, "q_proj"):
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif arch == "llama" and rest_is(name, "k_proj"):
            a = llama_cpp_permute(a, c.num_key_value_heads)
        if gemma and name.endswith("norm.weight"):  # llama.cpp's converter stores Gemma's norms as 1 + w
            a = a + 1
        if gname.endswith("ffn_gate_inp_shexp.weight"):  # the shared expert's gate: a vector in llama.cpp's files
            a = a.reshape(-1)
        tensors.append((gname, a))
    for gname, a in tensors:
        a = np.ascontiguousarray(a)
        keep = a.ndim == 1 or "ffn_gate_inp" in gname  # norms, biases and routers stay F32, as llama.cpp keeps them
        if not keep and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rest_is(name: str, proj: str) -> bool:
    return name.endswith(f"self_attn.{proj}.weight") or name.endswith(f"self_attn.{proj}.bias")


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt. The attention mask is explicit: without one, generate()
    guesses it from `ids != pad_token_id` and would hide prompt tokens that happen to equal the pad id."""
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _spm_pieces() -> tuple[list[str], list[str]]:
    from tokenizers import SentencePieceBPETokenizer

    corpus = [
        "Hello world, this is a test of the tokenizer.",
        "The quick brown fox jumps over the lazy dog.",
        "def foo(x):\n    return x * 2\n",
        "Numbers 12345 and 67890.",
        "naïve café résumé",
        "  leading spaces and    runs",
    ] * 20
    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(corpus, vocab_size=300, min_frequency=2, show_progress=False)
    model = json.loads(spm.to_str())["model"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model["merges"]]
    merged_set = set(merged)
    base = [t for t in model["vocab"] if t not in merged_set and t != "<unk>"]
    return merged, base


SPM_MARKERS = (("<|user|>", 4), ("<|end|>", 3))  # (token, GGUF token type: 4 user-defined, 3 control)
SPM_TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"


def write_spm_gguf(
    path,
    architecture: str = "llama",
    *,
    add_bos: bool | None = None,
    specials: tuple[str, str, str] = ("<unk>", "<s>", "</s>"),
    markers: tuple[tuple[str, int], ...] = SPM_MARKERS,
    chat_template: str = SPM_TEMPLATE,
) -> None:
    """A SentencePiece-like vocabulary as llama.cpp writes it: unk, bos, eos (`specials`, ids 0-2), 256 byte
    tokens, scored pieces, then the chat `markers`; no tensors (a tokenizer-only file)."""
    import gguf

    merged, base = _spm_pieces()
    tokens = list(specials) + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for i, piece in enumerate(merged):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))
    for i, piece in enumerate(base):
        tokens.append(piece)
        types.append(1)
        scores.append(-1000.0 - i)
    if architecture.startswith("gemma"):
        # Gemma files spell tokens made of several spaces with real spaces.
        tokens += ["  ", "   "]
        types += [1, 1]
        scores += [-5.0, -6.0]
    tokens += [t for t, _ in markers]
    types += [k for _, k in markers]
    scores += [0.0] * len(markers)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
