"""The newer families against transformers on the same tiny random checkpoints (written by `save_pretrained`):
qwen3 (per-head q/k norms), phi3 (fused qkv and gate_up projections) and the mixture-of-experts families
(mixtral, qwen2_moe with its shared expert, qwen3_moe; dense and sparse layers mixed), split over 1, 2 and 3
stages and unevenly: float32 logits within 1e-4, 32 greedy tokens identical, over real gRPC stages for one split
per family, and a batch of sessions on a MoE stage equal to each session alone."""

from __future__ import annotations

import pytest
import torch

from layerline.checkpoint import load_config
from layerline.errors import UnsupportedModelError
from layerline.model import MoE
from layerline.pipeline import LocalPipeline, split_layers
from tiny_models import TinySpec, hf_greedy

SPECS = [
    TinySpec("qwen3", kv_heads=2),
    TinySpec("qwen3", kv_heads=4, tie=True),
    TinySpec("phi3", kv_heads=2),
    TinySpec("mixtral", kv_heads=2),
    TinySpec("qwen2_moe", kv_heads=2, extra=(("decoder_sparse_step", 2), ("mlp_only_layers", [4]))),
    TinySpec("qwen3_moe", kv_heads=2, tie=True, extra=(("norm_topk_prob", True),)),
    TinySpec("qwen3_moe", kv_heads=1, extra=(("num_experts_per_tok", 3),)),
]
GEMMA_SPECS = [
    TinySpec("gemma2", kv_heads=2, tie=True),  # soft-capping 50/30 as the family's defaults, sliding every other
    TinySpec("gemma2", kv_heads=4, tie=True, extra=(("attn_logit_softcapping", None), ("query_pre_attn_scalar", 8))),
    TinySpec(
        "gemma3", kv_heads=2, tie=True, extra=(("layer_types", (["sliding_attention"] * 2 + ["full_attention"]) * 2),)
    ),
    TinySpec(
        "gemma3",
        kv_heads=1,
        tie=True,
        extra=(
            (
                "rope_parameters",
                {
                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                },
            ),
            ("final_logit_softcapping", 20.0),
        ),
    ),
]

SPLITS = [[6], [3, 3], [2, 2, 2], [1, 4, 1]]


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("counts", SPLITS, ids=["x".join(map(str, c)) for c in SPLITS])
def test_logits_and_greedy_tokens_match_transformers(tiny_checkpoint, spec, counts):
    folder, ref = tiny_checkpoint(spec)
    pipe = LocalPipeline.load(folder, split_layers(spec.layers, counts=counts))
    ids = _ids(2, 17)
    with torch.no_grad():
        expected = ref(ids).logits
    assert (pipe.forward(ids) - expected).abs().max().item() <= 1e-4
    caches = pipe.new_caches(rows=2, max_len=32)
    parts = [pipe.forward(ids[:, a:b], caches=caches) for a, b in ((0, 7), (7, 8), (8, 17))]
    assert (torch.cat(parts, dim=1) - expected).abs().max().item() <= 1e-4
    prompt = [0, *_ids(1, 8, seed=2)[0].tolist()]
    assert list(pipe.generate(prompt, 32)) == hf_greedy(ref, prompt, 32)


def test_the_configs_say_what_each_family_has(tiny_checkpoint):
    qwen3 = load_config(tiny_checkpoint(SPECS[0])[0])
    assert qwen3.qk_norm and not qwen3.qkv_bias and not qwen3.num_experts
    assert load_config(tiny_checkpoint(SPECS[2])[0]).fused_projections
    mixtral = load_config(tiny_checkpoint(SPECS[3])[0])
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.norm_topk_prob) == (4, 2, True)
    assert mixtral.moe_layers == (True,) * 6
    qwen2_moe = load_config(tiny_checkpoint(SPECS[4])[0])
    # sparse every 2nd layer (1, 3, 5), layer 4 dense by mlp_only_layers anyway, a shared expert
    assert qwen2_moe.moe_layers == (False, True, False, True, False, True)
    assert qwen2_moe.shared_expert_intermediate_size == 64 and qwen2_moe.qkv_bias


@pytest.mark.parametrize(
    "spec", [SPECS[3], SPECS[4], SPECS[5], "gemma3"], ids=["mixtral", "qwen2_moe", "qwen3_moe", "gemma3"]
)
def test_a_batch_of_sessions_on_moe_stages_equals_each_alone(tiny_checkpoint, spec):
    """(and on gemma3's stages: sliding layers with their own rotary base in a batched step)"""
    spec = GEMMA_SPECS[3] if spec == "gemma3" else spec
    folder, ref = tiny_checkpoint(spec)
    pipe = LocalPipeline.load(folder, split_layers(spec.layers, counts=[2, 4]))
    prompts = [_ids(1, n, seed=10 + n)[0].tolist() for n in (3, 11, 5, 1, 8)]
    alone = [list(pipe.generate(p, 12)) for p in prompts]
    assert alone == [hf_greedy(ref, p, 12) for p in prompts]
    assert pipe.generate_batch(prompts, 12) == alone
    # the stages' own batched step (several sessions' caches in one pass), as a stage server runs them
    stage = pipe.stages[0]
    caches = [stage.new_cache(1, 16) for _ in prompts[:3]]
    parts = [(torch.tensor([p[:3]]), torch.arange(3)[None], c, None) for p, c in zip(prompts, caches, strict=False)]
    together = stage.forward_many(parts)
    for (x, pos, _, _), got in zip(parts, together, strict=True):
        assert (got - stage.forward(x, pos, stage.new_cache(1, 16))).abs().max().item() <= 1e-5


def test_rows_are_grouped_by_expert_one_matmul_each(tiny_checkpoint, monkeypatch):
    """A MoE layer runs each expert once over all the rows routed to it."""
    folder, _ = tiny_checkpoint(SPECS[3])
    stage = LocalPipeline.load(folder, [(0, 6)]).stages[0]
    moe = stage.layers[0].mlp
    assert isinstance(moe, MoE)
    calls = []
    for e, expert in enumerate(moe.experts):
        original = expert.forward
        monkeypatch.setattr(expert, "forward", lambda x, e=e, f=original: calls.append((e, x.shape[0])) or f(x))
    x = torch.randn(1, 10, 64)
    out = moe.forward(x)
    _, chosen = moe.route(x.reshape(-1, 64))
    expected = torch.bincount(chosen.reshape(-1), minlength=4).tolist()
    assert sorted(calls) == [(e, n) for e, n in enumerate(expected) if n]  # one call per expert hit, all its rows
    assert sum(n for _, n in calls) == 10 * moe.top_k
    row = torch.stack([moe.forward(x[:, i : i + 1]) for i in range(10)], dim=1).reshape(out.shape)
    assert (row - out).abs().max().item() <= 1e-6


QUANT_SPECS = [SPECS[0], SPECS[2], SPECS[3], SPECS[4], SPECS[5], GEMMA_SPECS[0], GEMMA_SPECS[3]]


@pytest.mark.parametrize("spec", QUANT_SPECS, ids=[s.name for s in QUANT_SPECS])
def test_every_family_computes_from_quantized_blocks(tiny_checkpoint, spec):
    """--quantize int8 on each family: the matmuls run on Q8_0 blocks (routers stay float), and the logits stay
    those of the float model up to 8-bit rounding."""
    folder, ref = tiny_checkpoint(spec)
    quant = LocalPipeline.load(folder, split_layers(spec.layers, counts=[2, 4]), quantize="int8")
    exact = LocalPipeline.load(folder, split_layers(spec.layers, counts=[2, 4]))
    for stage, float_stage in zip(quant.stages, exact.stages, strict=True):
        assert stage.quantized and stage.weight_summary().startswith("quantized: Q8_0")
        assert stage.weight_bytes() < float_stage.weight_bytes() / 2
    ids = _ids(2, 17)
    with torch.no_grad():
        expected = ref(ids).logits
    got = quant.forward(ids)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1)).min().item()
    assert cos > 0.995, cos
    # the cache path (prefill chunk, one decode step, another chunk) agrees with the whole pass; a MoE router may
    # send a token elsewhere when 8-bit rounding differs between kernel paths, so the check is the cosine here too
    caches = quant.new_caches(rows=2, max_len=32)
    parts = torch.cat([quant.forward(ids[:, a:b], caches=caches) for a, b in ((0, 7), (7, 8), (8, 17))], dim=1)
    assert torch.nn.functional.cosine_similarity(parts.flatten(1), got.flatten(1)).min().item() > 0.995


def test_phi3_long_rope_is_refused_by_name(tmp_path):
    import json

    from layerline.config import ModelConfig

    path = tmp_path / "config.json"
    config = {
        "model_type": "phi3",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 320,
        "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
    }
    path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'longrope' is not supported"):
        ModelConfig.from_json_file(path)


GRPC_SPECS = [SPECS[0], SPECS[2], SPECS[3], SPECS[4], SPECS[6], "gemma2", "gemma3"]  # one per family


@pytest.mark.parametrize("spec", GRPC_SPECS, ids=[getattr(s, "name", s) for s in GRPC_SPECS])
def test_over_grpc_stages_the_tokens_are_transformers(tiny_checkpoint, stage_cluster, spec):
    from layerline.client import Client

    if isinstance(spec, str):
        spec = {"gemma2": GEMMA_SPECS[0], "gemma3": GEMMA_SPECS[3]}[spec]
    folder, ref = tiny_checkpoint(spec)
    route = stage_cluster(folder, split_layers(spec.layers, counts=[2, 4]))
    prompt = [0, *_ids(1, 8, seed=4)[0].tolist()]
    with Client(route) as client:
        out = client.generate(prompt, max_new_tokens=32, stop_token_ids=[], stream=False)
    assert out.token_ids == hf_greedy(ref, prompt, 32)


def test_info_and_plan_show_what_a_moe_layer_holds_and_what_it_computes(tiny_checkpoint, capsys):
    from layerline.cli import main

    folder, _ = tiny_checkpoint(SPECS[4])
    config = load_config(folder)
    # router + 4 experts of 3 x 64 x 32 + the shared expert (3 x 64 x 64) and its gate; 2 experts active
    held, active = 4 * 64 + 64 + 4 * 3 * 64 * 32 + 3 * 64 * 64, 4 * 64 + 64 + 2 * 3 * 64 * 32 + 3 * 64 * 64
    summary = config.moe_summary()
    assert f"holds {held / 1e6:.2f} M" in summary and f"with {active / 1e6:.2f} M per token" in summary
    assert "3 of 6 layers sparse" in summary and "top-2" in summary
    assert main(["info", "--model", folder, "--stages", "2"]) == 0
    assert summary in capsys.readouterr().out
    assert load_config(tiny_checkpoint(SPECS[0])[0]).moe_summary() == ""
    # the coordinator's plan says it too
    import asyncio

    import grpc

    from layerline.config import model_fingerprint
    from layerline.coordinator.service import start_coordinator
    from layerline.v1 import coordinator_pb2 as pb
    from layerline.v1 import coordinator_pb2_grpc

    async def plan() -> str:
        running = await start_coordinator(folder, "127.0.0.1", 0, settle_s=0.0)
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                stage = pb.StageReport(
                    address="127.0.0.1:7001",
                    model_fingerprint=model_fingerprint(config),
                    device="cpu",
                    dtype="float32",
                    decode_s_per_layer=1e-3,
                    memory_bytes=1 << 30,
                    bytes_per_param=4.0,
                )
                await stub.Register(pb.RegisterRequest(stage=stage), timeout=10)
                return (await stub.Plan(pb.PlanRequest(), timeout=10)).explanation
        finally:
            await running.stop()

    assert summary in asyncio.run(asyncio.wait_for(plan(), 60))


@pytest.mark.parametrize("spec", GEMMA_SPECS, ids=[f"{s.name}-{i}" for i, s in enumerate(GEMMA_SPECS)])
@pytest.mark.parametrize("counts", SPLITS, ids=["x".join(map(str, c)) for c in SPLITS])
def test_gemma_logits_and_greedy_tokens_match_transformers(tiny_checkpoint, spec, counts):
    test_logits_and_greedy_tokens_match_transformers(tiny_checkpoint, spec, counts)


def test_gemma_configs_in_their_older_form_and_what_is_refused():
    from layerline.config import ModelConfig

    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, vocab_size=320)
    old = ModelConfig.from_hf_dict(
        dict(
            base,
            model_type="gemma3_text",
            hidden_activation="gelu_pytorch_tanh",
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            sliding_window=512,
            sliding_window_pattern=3,
            query_pre_attn_scalar=16,
        )
    )
    assert old.architecture == "gemma3" and old.qk_norm and old.norm_offset and old.embed_scale
    assert (old.rope_theta, old.local_rope_theta, old.rope_scaling.factor) == (1e6, 1e4, 8.0)
    assert old.sliding_windows == (512, 512, None, 512, 512, None) and old.query_scale == 16**-0.5
    gemma2 = ModelConfig.from_hf_dict(dict(base, model_type="gemma2", sliding_window=64, attn_logit_softcapping=50))
    assert gemma2.sliding_windows == (64, None) * 3 and gemma2.attn_softcap == 50.0 and not gemma2.qk_norm
    with pytest.raises(UnsupportedModelError, match="vision tower"):
        ModelConfig.from_hf_dict(dict(base, model_type="gemma3", vision_config={}, text_config={}))
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu' is not supported for gemma2"):
        ModelConfig.from_hf_dict(dict(base, model_type="gemma2", hidden_activation="gelu"))
