"""Log-probabilities through the chain: each generated token's log-probability and its most likely alternatives,
computed at the last stage from the logits the sampler saw and returned with the step's result (server loop,
client loop, speculative rounds), and a sequence's per-token log-probabilities with alternatives (`score_top`).
The oracle is transformers' log-softmax over the same float32 checkpoint in one process."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from stage_wire import TIMEOUT, connect, first_step, open_chain

from layerline.client import Client, ClientConfig, RPCError
from layerline.v1 import stage_pb2
from layerline.wire_format import int64_rows
from tiny_models import TinySpec

SPEC = TinySpec("llama", layers=4, kv_heads=2)
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint(SPEC)


@pytest.fixture(scope="module")
def route(tiny, stage_cluster) -> list[str]:
    return stage_cluster(tiny[0], [(0, 1), (1, 3), (3, 4)])


def reference(model, ids: list[int]) -> torch.Tensor:
    """transformers' [len(ids), vocab] float32 log-softmax: row i is the distribution of token i + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def repetitive_prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, 300, (8,), generator=g).tolist()
    return phrase + torch.randint(3, 300, (3,), generator=g).tolist() + phrase[:4]


def check_pieces(ref, prompt: list[int], pieces, top: int) -> None:
    ids = [p.token_id for p in pieces]
    lp = reference(ref, prompt + ids)
    for i, p in enumerate(pieces):
        row = lp[len(prompt) - 1 + i]
        assert p.logprob == pytest.approx(float(row[p.token_id]), abs=TOL), i
        if top:
            want = row.topk(top)
            assert [t for t, _ in p.top_logprobs] == want.indices.tolist(), i
            assert [v for _, v in p.top_logprobs] == pytest.approx(want.values.tolist(), abs=TOL)
        else:
            assert p.top_logprobs == ()


@pytest.mark.parametrize("server_loop", [True, False])
@pytest.mark.parametrize("speculate", [None, "ngram"])
def test_generated_tokens_carry_transformers_log_probabilities(tiny, route, server_loop, speculate):
    prompt = repetitive_prompt(1)
    with Client(route, config=ClientConfig(server_loop=server_loop)) as client:
        pieces = list(
            client.generate(
                prompt, max_new_tokens=20, stop_token_ids=[], logprobs=True, top_logprobs=3, speculate=speculate
            )
        )
        assert len(pieces) == 20
        check_pieces(tiny[1], prompt, pieces, 3)
        gen = client.generate(prompt, max_new_tokens=6, stop_token_ids=[], logprobs=True, stream=False)
        assert gen.token_ids == [p.token_id for p in pieces[:6]]
        assert gen.logprobs == pytest.approx([p.logprob for p in pieces[:6]], abs=TOL) and gen.top_logprobs is None
        plain = client.generate(prompt, max_new_tokens=4, stop_token_ids=[], stream=False)
        assert plain.logprobs is None and plain.top_logprobs is None


def test_sampled_tokens_carry_the_models_log_probabilities_not_the_samplers(tiny, route):
    """At a temperature, with top-k and a repetition penalty, the log-probabilities are still the model's own."""
    prompt = repetitive_prompt(2)
    with Client(route) as client:
        pieces = list(
            client.generate(
                prompt,
                max_new_tokens=12,
                stop_token_ids=[],
                temperature=0.9,
                top_k=5,
                repetition_penalty=1.3,
                seed=4,
                top_logprobs=2,
            )
        )
    check_pieces(tiny[1], prompt, pieces, 2)


def test_a_sequences_scores_come_with_their_most_likely_alternatives(tiny, route):
    a, b = repetitive_prompt(3), repetitive_prompt(4)[:9]
    with Client(route) as client:
        scored = client.score_top([a, b], 4)
        assert [s.logprobs for s in scored] == [pytest.approx(x, abs=TOL) for x in client.score([a, b])]
        with pytest.raises(RPCError) as e:
            client.score_top([a], 21)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs" in str(e.value)
        with pytest.raises(RPCError) as e:
            client.generate(a, top_logprobs=-1, stream=False)
        assert "top_logprobs" in str(e.value)
        with pytest.raises(RPCError) as e:
            client.generate_batch([a, b], logprobs=True)
        assert "generate_batch reports no log-probabilities" in str(e.value)
    for seq, s in zip([a, b], scored, strict=True):
        lp = reference(tiny[1], seq)
        assert len(s.logprobs) == len(s.top_logprobs) == len(seq) - 1
        for i, t in enumerate(seq[1:]):
            assert s.logprobs[i] == pytest.approx(float(lp[i, t]), abs=TOL)
            want = lp[i].topk(4)
            assert [x for x, _ in s.top_logprobs[i]] == want.indices.tolist()
            assert [v for _, v in s.top_logprobs[i]] == pytest.approx(want.values.tolist(), abs=TOL)


def test_a_stage_refuses_too_many_alternatives_and_serves_on(tiny, stage_cluster):
    route = stage_cluster(tiny[0], [(0, 4)])

    async def raw():
        async with connect(route) as stubs:
            (sid,) = await open_chain(stubs, route, 64)
            call = stubs[0].Push()
            cases = [
                (first_step(sid, [5, 6], sampling=stage_pb2.SamplingParams(top_logprobs=21)), "top_logprobs"),
                (
                    first_step(sid, [5, 6], sample=False, targets=int64_rows([[6, -1]]), top_logprobs=30),
                    "top_logprobs must be at most 20",
                ),
            ]
            for seq, (step, words) in enumerate(cases, 1):
                step.seq = seq
                await call.write(step)
                reply = await asyncio.wait_for(call.read(), TIMEOUT)
                assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and words in reply.message, reply
            call.cancel()

    asyncio.run(asyncio.wait_for(raw(), 30))
    with Client(route) as client:
        assert len(client.generate([5, 6, 7], max_new_tokens=3, stop_token_ids=[], stream=False).token_ids) == 3
