"""The Llama-family transformer as plain torch, cut into stages: a `StageModel` owns layers [start, end) and, when
it is the first stage, the token embedding, when it is the last, the final norm and the LM head.

Stages chained in order compute exactly what the whole model computes; the arithmetic mirrors the reference
implementation (RMSNorm in float32, rotary on q and k, SwiGLU MLP) so float32 logits agree to ~1e-6. Weights come
in as a dict of tensors named as in Hugging Face checkpoints (`checkpoint.py` and `gguf_model.py` produce it); this
module knows nothing of files, tokenizers or the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from layerline.config import ModelConfig
from layerline.devices import HostStaging
from layerline.errors import BadInputError, CheckpointError
from layerline.kv_cache import ForwardPlan, KVCache, chunk_plan
from layerline.quant.decode import DecodeRows, StageDecoder
from layerline.quant.linear import QuantEmbedding, QuantLinear
from layerline.quant.tensor import QTensor
from layerline.rope import RotaryTable, apply_rotary

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expected_tensors(config: ModelConfig, start: int, end: int) -> dict[str, tuple[int, ...]]:
    """The HF-named tensors stage [start, end) needs, with their shapes."""
    c = config
    out: dict[str, tuple[int, ...]] = {}
    if start == 0 or (end == c.num_layers and c.tie_word_embeddings):
        out["model.embed_tokens.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(start, end):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (c.hidden_size,)
        if c.fused_projections:
            out[p + "self_attn.qkv_proj.weight"] = (c.q_size + 2 * c.kv_size, c.hidden_size)
        else:
            for name, rows in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
                out[p + f"self_attn.{name}.weight"] = (rows, c.hidden_size)
                if c.qkv_bias:
                    out[p + f"self_attn.{name}.bias"] = (rows,)
        if c.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (c.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (c.head_dim,)
        out[p + "self_attn.o_proj.weight"] = (c.hidden_size, c.q_size)
        if c.o_bias:
            out[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
        out[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        if c.sandwich_norms:
            out[p + "pre_feedforward_layernorm.weight"] = (c.hidden_size,)
            out[p + "post_feedforward_layernorm.weight"] = (c.hidden_size,)
        if c.is_moe(i):
            out.update(expert_tensors(c, p))
        elif c.fused_projections:
            out[p + "mlp.gate_up_proj.weight"] = (2 * c.intermediate_size, c.hidden_size)
            out[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
        else:
            out.update(mlp_tensors(p + "mlp.", c.hidden_size, c.intermediate_size, c.mlp_bias))
    if end == c.num_layers:
        out["model.norm.weight"] = (c.hidden_size,)
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return out


def mlp_tensors(p: str, hidden: int, inner: int, bias: bool = False, names=("gate_proj", "up_proj", "down_proj")):
    """A SwiGLU MLP's tensors under prefix `p` (gate, up, down named as `names`)."""
    gate, up, down = names
    out = {
        p + f"{gate}.weight": (inner, hidden),
        p + f"{up}.weight": (inner, hidden),
        p + f"{down}.weight": (hidden, inner),
    }
    if bias:
        out.update({p + f"{gate}.bias": (inner,), p + f"{up}.bias": (inner,), p + f"{down}.bias": (hidden,)})
    return out


MIXTRAL_EXPERT = ("w1", "w3", "w2")  # gate, up, down as Mixtral's checkpoints name them


def moe_prefix(config: ModelConfig, p: str) -> str:
    return p + ("block_sparse_moe." if config.architecture == "mixtral" else "mlp.")


def expert_tensors(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """A MoE layer's MLP tensors: the router, every expert (all are held, whatever the top-k), and qwen2_moe's
    shared expert with its gate."""
    c, m = config, moe_prefix(config, p)
    names = MIXTRAL_EXPERT if c.architecture == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, tuple[int, ...]] = {m + "gate.weight": (c.num_experts, c.hidden_size)}
    for e in range(c.num_experts):
        out.update(mlp_tensors(m + f"experts.{e}.", c.hidden_size, c.expert_intermediate_size, names=names))
    if c.shared_expert_intermediate_size:
        out.update(mlp_tensors(m + "shared_expert.", c.hidden_size, c.shared_expert_intermediate_size))
        out[m + "shared_expert_gate.weight"] = (1, c.hidden_size)
    return out


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _transposed(t: torch.Tensor) -> nn.Parameter:
    """Weights are kept as [in, out]: with MKL on CPU, x @ W_t streams memory-bound decode matmuls ~20% faster
    than x @ W.T on the [out, in] layout checkpoints use (measured: bench/model_speed.py)."""
    return _param(t.t().contiguous())


PACKED_MIN_ROWS = 4  # from 4 rows on, packed oneDNN weights beat MKL's x @ W_t (bench/gemm_rows.py)


def linear_t(
    x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None = None, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., in] @ w_t [in, out] (+ b) -> [..., out]; through `packed` (`pack_weight(w_t)`) when there is one and
    x has PACKED_MIN_ROWS rows or more."""
    x2 = x.reshape(-1, x.shape[-1])
    if packed is not None and x2.shape[0] >= PACKED_MIN_ROWS:
        out = torch.ops.mkldnn._linear_pointwise(x2, packed, b, "none", [], "")
    else:
        out = torch.mm(x2, w_t) if b is None else torch.addmm(b, x2, w_t)
    return out.view(*x.shape[:-1], w_t.shape[1])


def packing_unavailable(dtype: torch.dtype, device: torch.device) -> str:
    """Why `pack_weight` cannot serve this stage ("" if it can)."""
    if device.type != "cpu" or dtype != torch.float32:
        return f"packed weights are for float32 on CPU, not {str(dtype).removeprefix('torch.')} on {device.type}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN (mkldnn) linear kernels"
    return ""


def pack_weight(w_t: torch.Tensor) -> torch.Tensor:
    """A copy of w_t [in, out] in oneDNN's blocked layout for `linear_t`. On CPU (measured on an AMD EPYC) MKL's
    matmul streams one row at memory speed but takes a slow path from 4 rows on: a layer's matmuls for 4 rows cost
    ~3x one row's although the weights are read once either way. oneDNN on weights reordered once runs 4 rows in
    ~2x one row's time (1.65x faster than MKL) and 8-16 rows 1.5x faster; for 1 row it is slower, so one row
    stays on MKL. bench/gemm_rows.py measures it."""
    return torch.ops.mkldnn._reorder_linear_weight(w_t.t().contiguous(), 4)


def packed_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


HEAD_CHUNK = 4096  # vocab columns per LM-head chunk


def chunk_head(w: torch.Tensor) -> torch.Tensor:
    """The LM head [vocab, hidden] as [n, hidden, HEAD_CHUNK] transposed chunks (the last one zero-padded).
    MKL on CPU runs x @ chunk fast at batch 1 and batch 8 alike; one [hidden, vocab] matrix is slow at batch 8
    and the checkpoint's [vocab, hidden] layout slow at batch 1 (bench/model_speed.py)."""
    vocab, hidden = w.shape
    c = min(HEAD_CHUNK, vocab)
    n = -(-vocab // c)
    out = w.new_zeros(n, hidden, c)
    for j in range(n):
        part = w[j * c : (j + 1) * c]  # [<= c, hidden]
        out[j, :, : part.shape[0]] = part.t()
    return out


def head_logits(
    h: torch.Tensor, chunks: torch.Tensor, vocab: int, packed: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """h [..., hidden] -> logits [..., vocab] through the chunked head (and its packed chunks, if any: see
    `linear_t`)."""
    n, hidden, c = chunks.shape
    x2 = h.reshape(-1, hidden)
    out = torch.empty(x2.shape[0], n * c, dtype=h.dtype, device=h.device)
    if packed is not None and x2.shape[0] >= PACKED_MIN_ROWS:
        for j in range(n):
            out[:, j * c : (j + 1) * c] = torch.ops.mkldnn._linear_pointwise(x2, packed[j], None, "none", [], "")
        return out[:, :vocab].reshape(*h.shape[:-1], vocab)
    for j in range(n):
        torch.mm(x2, chunks[j], out=out[:, j * c : (j + 1) * c])
    return out[:, :vocab].reshape(*h.shape[:-1], vocab)


def embed_from_head(ids: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    """Rows of the tied embedding read from the chunked head: ids [...] -> [..., hidden]."""
    c = chunks.shape[2]
    return chunks[ids // c, :, ids % c]


class RMSNorm(nn.Module):
    """`offset`: Gemma's form, scaling by (1 + w) in float32 before rounding to the compute dtype."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.offset = offset
        self.weight = _param(1.0 + weight.float() if offset else weight)
        self.eps = eps
        self.shape = (weight.shape[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; bitwise what the reference's float32 formula gives
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        if self.offset:
            return F.rms_norm(x.float(), self.shape, self.weight, self.eps).to(x.dtype)
        # the reference normalises in float32, rounds to the compute dtype, then applies the weight
        return self.weight * F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.groups = config.num_heads // config.num_kv_heads
        # one matmul for q, k and v: rows [q | k | v]
        if config.fused_projections:
            qkv = [w[prefix + "qkv_proj.weight"]]
        else:
            qkv = [w[prefix + f"{n}_proj.weight"] for n in ("q", "k", "v")]
        self.norms = qk_norms(config, w, prefix)
        self.scale, self.softcap = config.query_scale, config.attn_softcap
        bqkv = torch.cat([w[prefix + f"{n}_proj.bias"] for n in ("q", "k", "v")]) if config.qkv_bias else None
        bo = w[prefix + "o_proj.bias"] if config.o_bias else None
        self.q_qkv: QuantLinear | None = None  # quantized blocks (where the fused QuantBlock does not serve the family)
        self.q_o: QuantLinear | None = None
        if isinstance(qkv[0], QTensor):
            self.q_qkv, self.q_o = QuantLinear(qkv, bqkv), QuantLinear([w[prefix + "o_proj.weight"]], bo)
            self.wqkv_t = self.bqkv = self.wo_t = self.bo = None
        else:
            self.wqkv_t = _transposed(torch.cat(qkv))  # [hidden, (H + 2 Hkv) * D]
            self.bqkv = _param(bqkv) if bqkv is not None else None
            self.wo_t = _transposed(w[prefix + "o_proj.weight"])  # [H * D, hidden]
            self.bo = _param(bo) if bo is not None else None
        self.wqkv_p: torch.Tensor | None = None  # packed copies (StageModel.pack_weights)
        self.wo_p: torch.Tensor | None = None

    def quant_linears(self) -> list[QuantLinear]:
        return [] if self.q_qkv is None else [self.q_qkv, self.q_o]

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_qkv(x) if self.q_qkv is not None else linear_t(x, self.wqkv_t, self.bqkv, self.wqkv_p)

    def _o(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_o(x) if self.q_o is not None else linear_t(x, self.wo_t, self.bo, self.wo_p)

    def pack(self) -> int:
        self.wqkv_p, self.wo_p = pack_weight(self.wqkv_t), pack_weight(self.wo_t)
        return packed_nbytes(self.wqkv_p) + packed_nbytes(self.wo_p)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        plan: ForwardPlan,
    ) -> torch.Tensor:
        qkv = self._qkv(x)  # [B, T, (H + 2 Hkv) * D]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        out = attend(qkv, H, Hkv, D, cos, sin, mask, cache, layer, plan, self.norms, self.scale, self.softcap)
        return self._o(out)

    def forward_many(
        self,
        x: torch.Tensor,
        sizes: list[int],
        rotary: list[tuple[torch.Tensor, torch.Tensor]],
        masks: list[torch.Tensor | None],
        caches: list[KVCache],
        layer: int,
        plans: list[ForwardPlan],
    ) -> torch.Tensor:
        """Several sessions' rows stacked in `x` (`sizes` rows each): the projections run once over all of them,
        attention per session against its own cache."""
        qkv = self._qkv(x)
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        outs = [
            attend(part, H, Hkv, D, cs[0], cs[1], mask, cache, layer, plan, self.norms, self.scale, self.softcap)
            for part, cs, mask, cache, plan in zip(qkv.split(sizes), rotary, masks, caches, plans, strict=True)
        ]
        return self._o(torch.cat(outs))


def qk_norms(config: ModelConfig, w: dict[str, torch.Tensor], prefix: str) -> tuple[RMSNorm, RMSNorm] | None:
    """The per-head RMSNorms of q and k (qwen3), or None."""
    if not config.qk_norm:
        return None
    eps, offset = config.rms_norm_eps, config.norm_offset
    return RMSNorm(w[prefix + "q_norm.weight"], eps, offset), RMSNorm(w[prefix + "k_norm.weight"], eps, offset)


def attend(
    qkv: torch.Tensor,
    H: int,
    Hkv: int,
    D: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    cache: KVCache | None,
    layer: int,
    plan: ForwardPlan,
    norms: tuple[RMSNorm, RMSNorm] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Projected q, k, v [B, T, (H + 2 Hkv) * D] -> attention output [B, T, H * D] (q/k norms where the model has
    them, rotary, cache, SDPA). `scale`: the scores' (None: D ** -0.5); `softcap`: scores capped to
    softcap * tanh(scores / softcap) before the mask and softmax (Gemma 2), computed step by step as SDPA cannot."""
    B, T, _ = qkv.shape
    G = H // Hkv
    qk = qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D)
    if norms is not None:  # each head of q and of k normalised before rotary
        qk = torch.cat([norms[0].forward(qk[:, :, :H]), norms[1].forward(qk[:, :, H:])], dim=2)
    # rotary once over q and k together: [B, H + Hkv, T, D]
    qk = apply_rotary(qk.transpose(1, 2), cos, sin)
    q, k = qk[:, :H], qk[:, H:]  # [B, H, T, D], [B, Hkv, T, D]
    v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
    if cache is not None:
        k, v = cache.update(layer, k, v, plan)  # [B, Hkv, S, D]
    # grouped-query attention without repeating K/V: the G query heads of one KV head become G*T query rows
    q = q.reshape(B, Hkv, G * T, D)  # q heads are ordered kv_head * G + g
    if mask is not None and G > 1:
        mask = mask.repeat(1, 1, G, 1)  # [B|1, 1, G*T, S]
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, G*T, D]
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
        scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    return out.view(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). `names`: how the checkpoint calls gate, up and down; `fused`: gate
    and up stored as one gate_up_proj (phi3)."""

    def __init__(
        self,
        w: dict[str, torch.Tensor],
        prefix: str,
        bias: bool = False,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        fused: bool = False,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        self.gelu = activation == "gelu_tanh"  # GeGLU (Gemma) instead of SwiGLU
        gate, up, down = (prefix + n for n in names)
        parts = [w[prefix + "gate_up_proj.weight"]] if fused else [w[gate + ".weight"], w[up + ".weight"]]
        b_gate_up = torch.cat([w[gate + ".bias"], w[up + ".bias"]]) if bias else None
        b_down = w[down + ".bias"] if bias else None
        self.q_gate_up: QuantLinear | None = None  # quantized blocks
        self.q_down: QuantLinear | None = None
        if isinstance(parts[0], QTensor):
            self.q_gate_up, self.q_down = QuantLinear(parts, b_gate_up), QuantLinear([w[down + ".weight"]], b_down)
            self.w_gate_up_t = self.b_gate_up = self.w_down_t = self.b_down = None
        else:
            self.w_gate_up_t = _transposed(torch.cat(parts))  # [hidden, 2 * intermediate]
            self.b_gate_up = _param(b_gate_up) if b_gate_up is not None else None
            self.w_down_t = _transposed(w[down + ".weight"])  # [intermediate, hidden]
            self.b_down = _param(b_down) if b_down is not None else None
        self.w_gate_up_p: torch.Tensor | None = None  # packed copies (StageModel.pack_weights)
        self.w_down_p: torch.Tensor | None = None

    def quant_linears(self) -> list[QuantLinear]:
        return [] if self.q_gate_up is None else [self.q_gate_up, self.q_down]

    def pack(self) -> int:
        self.w_gate_up_p, self.w_down_p = pack_weight(self.w_gate_up_t), pack_weight(self.w_down_t)
        return packed_nbytes(self.w_gate_up_p) + packed_nbytes(self.w_down_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_gate_up is not None:
            gate_up = self.q_gate_up(x)
            if not self.gelu:  # SwiGLU fused into the down projection's kernel
                return self.q_down(gate_up, swiglu=True)
            gate, up = gate_up.chunk(2, dim=-1)
            return self.q_down(F.gelu(gate, approximate="tanh") * up)
        gate, up = linear_t(x, self.w_gate_up_t, self.b_gate_up, self.w_gate_up_p).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return linear_t(act * up, self.w_down_t, self.b_down, self.w_down_p)


class MoE(nn.Module):
    """A sparse mixture-of-experts MLP: a router picks each token's top-k experts (softmax in float32 over all
    experts, then the k largest, renormalised when the model says so) and the token's output is the weighted sum
    of those experts' SwiGLU MLPs, added in expert order. Rows are grouped by expert: one matmul per expert over
    the rows routed to it, whatever sessions they come from, so a row's result does not depend on its batch.
    qwen2_moe adds a shared expert every token goes through, scaled by a sigmoid gate."""

    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], p: str) -> None:
        super().__init__()
        c, m = config, moe_prefix(config, p)
        names = MIXTRAL_EXPERT if c.architecture == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        self.router = _param(w[m + "gate.weight"])  # [experts, hidden], applied as F.linear like the reference
        self.experts = nn.ModuleList(MLP(w, m + f"experts.{e}.", names=names) for e in range(c.num_experts))
        self.top_k, self.renormalise = c.experts_per_token, c.norm_topk_prob
        self.shared = MLP(w, m + "shared_expert.") if c.shared_expert_intermediate_size else None
        self.shared_gate = _param(w[m + "shared_expert_gate.weight"]) if self.shared is not None else None

    def pack(self) -> int:
        return 0  # experts see a few rows each: MKL's path for few rows is the fast one

    def quant_linears(self) -> list[QuantLinear]:
        mlps = [*self.experts, *([self.shared] if self.shared is not None else [])]
        return [lin for m in mlps for lin in m.quant_linears()]

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x2 [N, hidden] -> (weights [N, k] in x's dtype, expert ids [N, k])."""
        probs = F.softmax(F.linear(x2, self.router), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x2.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(x2)
        out = torch.zeros_like(x2)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (row, slot) pairs grouped by expert, rows ascending
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        rows, slot_weights = order // self.top_k, weights.reshape(-1)[order]
        at = 0
        for e, n in enumerate(counts):
            if n:
                r = rows[at : at + n]
                out.index_add_(0, r, self.experts[e].forward(x2[r]) * slot_weights[at : at + n, None])
                at += n
        if self.shared is not None:
            out = out + torch.sigmoid(F.linear(x2, self.shared_gate)) * self.shared.forward(x2)
        return out.view(x.shape)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], index: int) -> None:
        super().__init__()
        p = f"model.layers.{index}."
        c = config
        eps, offset = c.rms_norm_eps, c.norm_offset
        self.window = c.sliding_window(index)
        self.local_rope = bool(c.local_rope_theta) and self.window is not None  # gemma3's sliding layers
        self.attn_norm = RMSNorm(w[p + "input_layernorm.weight"], eps, offset)
        self.attn = Attention(c, w, p + "self_attn.")
        # Gemma's sandwich: post_attention_layernorm normalises the attention output, pre_feedforward_layernorm
        # the MLP input, post_feedforward_layernorm its output (Llama's post_attention_layernorm is the MLP input's)
        self.attn_post = RMSNorm(w[p + "post_attention_layernorm.weight"], eps, offset) if c.sandwich_norms else None
        mlp_in = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
        self.mlp_norm = RMSNorm(w[p + mlp_in + ".weight"], eps, offset)
        self.mlp_post = RMSNorm(w[p + "post_feedforward_layernorm.weight"], eps, offset) if c.sandwich_norms else None
        if c.is_moe(index):
            self.mlp = MoE(c, w, p)
        else:
            self.mlp = MLP(w, p + "mlp.", c.mlp_bias, fused=c.fused_projections, activation=c.activation)

    def step(self, h, cos, sin, mask, cache, layer, plan) -> torch.Tensor:
        # .forward directly: nn.Module.__call__'s hook machinery costs ~3 us a call, 4 calls a layer per token
        a = self.attn.forward(self.attn_norm.forward(h), cos, sin, mask, cache, layer, plan)
        return self._mlp(h + (a if self.attn_post is None else self.attn_post.forward(a)))

    def step_many(self, h, sizes, rotary, masks, caches, layer, plans) -> torch.Tensor:
        a = self.attn.forward_many(self.attn_norm.forward(h), sizes, rotary, masks, caches, layer, plans)
        return self._mlp(h + (a if self.attn_post is None else self.attn_post.forward(a)))

    def quant_linears(self) -> list[QuantLinear]:
        return self.attn.quant_linears() + self.mlp.quant_linears()

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        m = self.mlp.forward(self.mlp_norm.forward(h))
        return h + (m if self.mlp_post is None else self.mlp_post.forward(m))


class QuantBlock(nn.Module):
    """A layer on quantized weights: the same arithmetic as `Block`, with each matmul's neighbours fused into it
    (RMSNorm into the q/k/v and gate/up projections, SwiGLU into the down projection, both residual adds into
    the output projections), so a decode step costs four kernel calls and attention per layer. `step` updates the
    hidden states in place."""

    def __init__(self, config: ModelConfig, w: dict, index: int) -> None:
        super().__init__()
        p = f"model.layers.{index}."
        a, m = p + "self_attn.", p + "mlp."
        c = config
        self.window = c.sliding_window(index)
        self.eps = c.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.attn_norm = w[p + "input_layernorm.weight"].float().contiguous()
        self.mlp_norm = w[p + "post_attention_layernorm.weight"].float().contiguous()
        qkv_bias = torch.cat([w[a + f"{n}_proj.bias"] for n in ("q", "k", "v")]) if c.qkv_bias else None
        # q, k and v (gate and up) as parts of one linear: one kernel call, no stacked copy of the weights
        if c.fused_projections:
            self.qkv = QuantLinear([w[a + "qkv_proj.weight"]], None)
        else:
            self.qkv = QuantLinear([w[a + f"{n}_proj.weight"] for n in ("q", "k", "v")], qkv_bias)
        self.o = QuantLinear([w[a + "o_proj.weight"]], w[a + "o_proj.bias"] if c.o_bias else None)
        gate_up = (
            [w[m + "gate_up_proj.weight"]]
            if c.fused_projections
            else [w[m + "gate_proj.weight"], w[m + "up_proj.weight"]]
        )
        self.gate_up = QuantLinear(
            gate_up, torch.cat([w[m + "gate_proj.bias"], w[m + "up_proj.bias"]]) if c.mlp_bias else None
        )
        self.down = QuantLinear([w[m + "down_proj.weight"]], w[m + "down_proj.bias"] if c.mlp_bias else None)

    @property
    def nbytes(self) -> int:
        norms = self.attn_norm.nbytes + self.mlp_norm.nbytes
        return norms + sum(x.nbytes for x in (self.qkv, self.o, self.gate_up, self.down))

    def _mlp(self, h: torch.Tensor) -> None:
        gate_up = self.gate_up(h, norm=self.mlp_norm, eps=self.eps)
        self.down(gate_up, swiglu=True, add_to=h)

    def step(self, h, cos, sin, mask, cache, layer, plan) -> torch.Tensor:
        qkv = self.qkv(h, norm=self.attn_norm, eps=self.eps)
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.o(attend(qkv, H, Hkv, D, cos, sin, mask, cache, layer, plan), add_to=h)
        self._mlp(h)
        return h

    def step_many(self, h, sizes, rotary, masks, caches, layer, plans) -> torch.Tensor:
        qkv = self.qkv(h, norm=self.attn_norm, eps=self.eps)
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        outs = [
            attend(part, H, Hkv, D, cs[0], cs[1], mask, cache, layer, plan)
            for part, cs, mask, cache, plan in zip(qkv.split(sizes), rotary, masks, caches, plans, strict=True)
        ]
        self.o(torch.cat(outs), add_to=h)
        self._mlp(h)
        return h


class StageModel(nn.Module):
    """Layers [start, end) of a model; see the module docstring. Construction consumes `tensors` (entries are
    removed as they are turned into the stage's own layout), so a stage never holds two copies of its weights.

    Matmul weights given as `QTensor`s (GGUF blocks, or float weights quantized at load) stay quantized: their
    layers are `QuantBlock`s, the embedding and LM head are looked up and computed from the blocks, and the stage
    computes in float32 (the kernels' activations)."""

    def __init__(
        self,
        config: ModelConfig,
        start: int,
        end: int,
        tensors: dict[str, torch.Tensor | QTensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        check_range(config, start, end)
        self.config, self.start, self.end = config, start, end
        self.is_first, self.is_last = start == 0, end == config.num_layers
        self.quantized = any(isinstance(t, QTensor) for t in tensors.values())
        if self.quantized and (dtype != torch.float32 or torch.device(device).type != "cpu"):
            raise ValueError("a stage on quantized weights computes in float32 on the CPU")
        self.dtype, self.device = dtype, torch.device(device)
        w = _checked(config, start, end, tensors, dtype, self.device)
        self.layers = nn.ModuleList()
        # the fused QuantBlock serves Llama-shaped layers; the other families' layers compute from the same blocks
        # through Block, each matmul a QuantLinear and the rest in torch
        fused = not (config.qk_norm or config.num_experts or config.sandwich_norms or config.activation != "silu")
        for i in range(start, end):
            quantized = isinstance(w[f"model.layers.{i}.self_attn.o_proj.weight"], QTensor)
            self.layers.append(QuantBlock(config, w, i) if quantized and fused else Block(config, w, i))
            for name in [n for n in w if n.startswith(f"model.layers.{i}.")]:
                del w[name]
        self.norm = RMSNorm(w["model.norm.weight"], config.rms_norm_eps, config.norm_offset) if self.is_last else None
        self.head: nn.Parameter | None = None  # LM head, chunked: [n, hidden, HEAD_CHUNK]
        self.head_q: QuantLinear | None = None  # or quantized
        if self.is_last:
            head = w["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
            if isinstance(head, QTensor):
                self.head_q = QuantLinear([head])
            else:
                self.head = _param(chunk_head(head))
        self.embed: nn.Parameter | None = None  # [vocab, hidden]
        self.embed_q: QuantEmbedding | None = None  # or quantized
        self.embed_in_head = self.is_first and self.is_last and config.tie_word_embeddings  # one copy, two roles
        if self.is_first:
            table = w["model.embed_tokens.weight"]
            if isinstance(table, QTensor):
                self.embed_q = QuantEmbedding(table)
                self.embed_in_head = False
            elif not self.embed_in_head:
                self.embed = _param(table)
        self.windows = {b.window for b in self.layers}
        self.decoder: StageDecoder | None = None  # decode steps through every layer in one call
        if self.layers and all(isinstance(b, QuantBlock) for b in self.layers):
            c = config
            self.decoder = StageDecoder(
                list(self.layers), c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.rms_norm_eps
            )
        self.rotary = RotaryTable(config, self.device)
        # gemma3: sliding layers rotate with their own base
        local = any(getattr(b, "local_rope", False) for b in self.layers)
        self.rotary_local = RotaryTable(config, self.device, local=True) if local else None
        self.staging = HostStaging(self.device)  # hidden states to and from the device, through reused buffers
        self.head_p: list[torch.Tensor] | None = None  # packed head chunks (pack_weights)
        self.packed_bytes = 0

    def pack_weights(self) -> None:
        """Add a second copy of every matmul weight (layers and LM head) in oneDNN's packed layout, used for steps
        of PACKED_MIN_ROWS rows or more (batched decode steps of several sessions, micro-batches, prefill): their
        matmuls run ~1.5x faster on CPU, for one more copy of the weights in memory (see `pack_weight`). Raises
        ValueError where unavailable."""
        why = packing_unavailable(self.dtype, self.device)
        if self.quantized:
            why = "packed weights are for float32 weights; this stage's weights are quantized"
        if why:
            raise ValueError(why)
        if self.packed_bytes:
            return
        total = 0
        for block in self.layers:
            total += block.attn.pack() + block.mlp.pack()
        if self.head is not None:
            self.head_p = [pack_weight(chunk) for chunk in self.head]
            total += sum(packed_nbytes(p) for p in self.head_p)
        self.packed_bytes = total

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def weight_bytes(self) -> int:
        """The bytes of weights this stage holds (quantized blocks as stored, float tensors, packed copies)."""
        seen, total = set(), 0
        tensors = list(self.parameters())
        for block in self.layers:
            if isinstance(block, QuantBlock):
                tensors += [block.attn_norm, block.mlp_norm]
        tensors += [t for lin in self.quant_linears() for t in _held(lin)]
        if self.embed_q is not None:
            tensors.append(self.embed_q.table.data)
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.nbytes
        return total + self.packed_bytes

    def quant_linears(self) -> list:
        """The quantized matmuls of this stage (QuantLinear), layer by layer, then the LM head's."""
        linears = [
            lin
            for b in self.layers
            for lin in ((b.qkv, b.o, b.gate_up, b.down) if isinstance(b, QuantBlock) else b.quant_linears())
        ]
        return linears + ([] if self.head_q is None else [self.head_q])

    def weight_summary(self) -> str:
        """What the matmul weights are held as, by type and bytes, e.g. "quantized: Q4_K 61.2 MiB, Q6_K 20.1 MiB"
        (or "float32")."""
        if not self.quantized:
            return str(self.dtype).removeprefix("torch.")
        counts: dict[str, int] = {}
        parts = [p for lin in self.quant_linears() for p in lin.parts]
        if self.embed_q is not None and all(p is not self.embed_q.table for p in parts):
            parts.append(self.embed_q.table)
        for p in parts:
            counts[p.type_name] = counts.get(p.type_name, 0) + p.nbytes
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])
        return "quantized: " + ", ".join(f"{k} {v / (1 << 20):.1f} MiB" for k, v in ordered)

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(self.num_layers, rows, c.num_kv_heads, c.head_dim, max_len, self.dtype, self.device)

    def cache_bytes(self, rows: int, max_len: int) -> int:
        c = self.config
        return KVCache.bytes_needed(self.num_layers, rows, c.num_kv_heads, c.head_dim, max_len, self.dtype.itemsize)

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rows: list[int] | None = None,
        last_only: bool = False,
        decode_columns: bool = False,
    ) -> torch.Tensor:
        """x: token ids [B, T] (first stage) or hidden states [B, T, hidden] (later stages).
        positions: [B, T] int64, -1 marks padding; None = continue each row from its cache length (or 0).
        Returns hidden states [B, T, hidden], or float32 logits [B, T|1, vocab] at the last stage
        (only the last column with `last_only`). `decode_columns`: the T columns (one row) stand for T decode
        steps (speculative decoding) and are computed as those would be (quantized weights: the decode kernel)."""
        x = self._check_input(x)
        B, T = x.shape[:2]
        if positions is None:
            lengths = [0] * B if cache is None else [cache.lengths[r] for r in (rows or range(B))]
            positions = torch.tensor(lengths, dtype=torch.int64)[:, None] + torch.arange(T)
        else:
            positions = positions.to("cpu", torch.int64)
            if positions.shape != (B, T):
                raise BadInputError(f"positions have shape {tuple(positions.shape)}, expected {(B, T)}")
        if cache is None:
            plan = chunk_plan(positions, self.windows, self.device)
        else:
            plan = cache.plan(positions, rows, self.windows)
        h = self._embed(x)
        cos, sin = self.rotary.lookup(plan.positions, self.dtype, top=plan.top)
        rows = None
        if self.decoder is not None:
            rows = DecodeRows.of([plan], [cache], self.config.head_dim, decode_columns)
        if rows is not None:  # a decode step: all layers in one call (quant/decode.py)
            self.decoder(h, cos, sin, rows)
        else:
            local = (
                None if self.rotary_local is None else self.rotary_local.lookup(plan.positions, self.dtype, plan.top)
            )
            for i, block in enumerate(self.layers):
                c, s = local if local is not None and block.local_rope else (cos, sin)
                h = block.step(h, c, s, plan.masks[block.window], cache, i, plan)
        if cache is not None:
            cache.commit(plan)
        if not self.is_last:
            return h
        if last_only:
            h = h[:, -1:]
        return self._logits(h)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or incoming hidden states -> the hidden states the layers work on (a tensor of
        the stage's own when its layers update it in place)."""
        if not self.is_first:
            return x.clone() if self.quantized else x
        if self.embed_q is not None:
            h = self.embed_q(x)
        elif self.embed_in_head:
            h = embed_from_head(x, self.head)
        else:
            h = F.embedding(x, self.embed)
        if self.config.embed_scale:  # Gemma: sqrt(hidden), rounded to the compute dtype as the reference does
            h = h * torch.tensor(self.config.hidden_size**0.5, dtype=h.dtype)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.head_q is not None:
            logits = self.head_q(h.contiguous(), norm=self.norm.weight, eps=self.norm.eps)
        else:
            logits = head_logits(self.norm.forward(h), self.head, self.config.vocab_size, self.head_p).float()
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.inference_mode()
    def forward_many(
        self,
        parts: Sequence[tuple[torch.Tensor, torch.Tensor, KVCache, list[int] | None]],
        last_only: bool = False,
    ) -> list[torch.Tensor]:
        """The steps of several sessions in one pass (selective batching): each part is (x, positions, cache, rows)
        as for `forward`, all with the same number of columns T (decode steps: T = 1), each with its own cache.
        The embedding, the projections, the MLP and the LM head run once over all the parts' rows; rotary, the
        cache and attention run per part. Returns what `forward` would return for each part."""
        if len(parts) == 1:
            x, positions, cache, rows = parts[0]
            return [self.forward(x, positions, cache, rows, last_only)]
        if len({id(p[2]) for p in parts}) != len(parts):
            raise ValueError("each part of a batched step needs a cache of its own")
        xs, plans, sizes = [], [], []
        for x, positions, cache, rows in parts:
            x = self._check_input(x)
            B, T = x.shape[:2]
            if T != parts[0][0].shape[1]:
                raise BadInputError(
                    f"parts of a batched step must have the same width, got {T} and {parts[0][0].shape[1]}"
                )
            positions = positions.to("cpu", torch.int64)
            if positions.shape != (B, T):
                raise BadInputError(f"positions have shape {tuple(positions.shape)}, expected {(B, T)}")
            plans.append(cache.plan(positions, rows, self.windows))
            xs.append(x)
            sizes.append(B)
        h = self._embed(torch.cat(xs))
        rotary = [self.rotary.lookup(plan.positions, self.dtype, top=plan.top) for plan in plans]
        caches = [p[2] for p in parts]
        rows = DecodeRows.of(plans, caches, self.config.head_dim) if self.decoder is not None else None
        if rows is not None:  # the sessions' decode steps through all layers in one call (quant/decode.py)
            self.decoder(h, torch.cat([c for c, _ in rotary]), torch.cat([s for _, s in rotary]), rows)
        else:
            local = None
            if self.rotary_local is not None:
                local = [self.rotary_local.lookup(plan.positions, self.dtype, top=plan.top) for plan in plans]
            for i, block in enumerate(self.layers):
                masks = [plan.masks[block.window] for plan in plans]
                h = block.step_many(h, sizes, local if local and block.local_rope else rotary, masks, caches, i, plans)
        for cache, plan in zip(caches, plans, strict=True):
            cache.commit(plan)
        if self.is_last:
            if last_only:
                h = h[:, -1:]
            h = self._logits(h)
        return list(h.split(sizes))

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise BadInputError(
                    f"the first stage takes token ids [batch, tokens] int64, got {x.dtype} {tuple(x.shape)}"
                )
            if x.numel() <= 64:  # decode steps: plain Python is cheaper than two reductions
                flat = [t for row in x.tolist() for t in row]
                lo, hi = (min(flat), max(flat)) if flat else (0, 0)
            else:
                lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise BadInputError(f"token ids must be in [0, {self.config.vocab_size}), got {lo}..{hi}")
            x = x.to(self.device, torch.int64)
        else:
            if x.dim() != 3 or not x.is_floating_point() or x.shape[-1] != self.config.hidden_size:
                raise BadInputError(
                    f"stage {self.start}:{self.end} takes hidden states [batch, tokens, {self.config.hidden_size}] "
                    f"(float), got {x.dtype} {tuple(x.shape)}"
                )
            x = self.staging.to_device(x, self.dtype)
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise BadInputError(f"empty input {tuple(x.shape)}")
        return x


def check_range(config: ModelConfig, start: int, end: int) -> None:
    if not 0 <= start < end <= config.num_layers:
        raise ValueError(f"layer range {start}:{end} is not within the model's {config.num_layers} layers")


def _checked(
    config: ModelConfig,
    start: int,
    end: int,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Every tensor the stage needs, present and of the right shape, in the stage's dtype and device (taken out
    of `tensors`)."""
    out = {}
    expected = expected_tensors(config, start, end)
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"missing tensor {name!r} (needed by layers {start}:{end})")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if not isinstance(t, QTensor) and not t.is_floating_point():
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, expected a floating point type")
    for name in expected:
        t = tensors.pop(name)
        out[name] = t if isinstance(t, QTensor) else t.to(device=device, dtype=dtype)
    return out


def _held(lin: QuantLinear) -> list[torch.Tensor]:
    return [p.data for p in lin.parts] + ([] if lin.bias is None else [lin.bias])
