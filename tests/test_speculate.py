"""Speculative decoding through the pipeline: a round sends the last token and k proposals (prompt lookup) through
the chain as one step, the last stage verifies them and answers the accepted run plus one token, and every stage
rolls its cache back past the rejected ones. Greedy output must be what non-speculative greedy decoding and
transformers give, with the server loop (the last stage proposes) and the client loop (the client proposes); the
sampling rule must leave each token's distribution unchanged; stop tokens, stop strings, max_new_tokens, the
session's continuation and bad steps behave as without speculation."""

from __future__ import annotations

import asyncio
import collections

import grpc
import pytest
import torch
from stage_wire import TIMEOUT, connect, first_step, infos, open_chain, probe

from layerline.client import Client, ClientConfig, RPCError
from layerline.draft import DraftModel
from layerline.errors import CheckpointError
from layerline.sampling import SamplingParams, verify
from layerline.speculate import MAX_DRAFTS, START_K, AdaptiveK, ngram_propose
from layerline.tokenizer import Tokenizer
from layerline.v1 import stage_pb2
from tiny_models import TinySpec, byte_tokenizer, hf_greedy, save_hf

SPEC = TinySpec("llama", layers=4, kv_heads=2)
SPLITS = {"1": [(0, 4)], "2": [(0, 2), (2, 4)], "3": [(0, 1), (1, 3), (3, 4)]}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint(SPEC)


@pytest.fixture(scope="module")
def routes(tiny, stage_cluster) -> dict[str, list[str]]:
    return {name: stage_cluster(tiny[0], ranges) for name, ranges in SPLITS.items()}


@pytest.fixture(scope="module")
def drafts(tmp_path_factory) -> dict[str, str]:
    """Draft models for the tiny chain: another model with its tokenizer, one whose tokenizer has a token more,
    and one with a smaller vocabulary."""
    made = {}
    for name, spec, seed in [
        ("other", SPEC, 5),
        ("retokenized", SPEC, 5),
        ("small", TinySpec("llama", 2, vocab=300), 5),
    ]:
        folder = str(tmp_path_factory.mktemp(f"draft-{name}"))
        save_hf(spec, folder, seed=seed)
        made[name] = folder
    tok = byte_tokenizer()
    tok.add_tokens(["<|draft|>"])
    tok.save(f"{made['retokenized']}/tokenizer.json")
    return made


def repetitive_prompt(seed: int) -> list[int]:
    """A prompt whose text repeats (as code being edited does): prompt lookup finds its continuations."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, 300, (9,), generator=g).tolist()
    return phrase + torch.randint(3, 300, (3,), generator=g).tolist() + phrase[:4]


# ---- the proposer and the rule, alone ------------------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_longest_most_recent_tail():
    assert ngram_propose([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]  # tail [2, 3] occurred at 1..2
    assert ngram_propose([5, 1, 2, 7, 8, 1, 2, 6, 1, 2], 3) == [6, 1, 2]  # the most recent occurrence wins
    assert ngram_propose([1, 2, 3, 1, 9, 2, 3], 4) == [1, 9, 2, 3]  # [2, 3] before the shorter tail [3]
    assert ngram_propose([4, 5, 6], 3) == []  # nothing occurred before
    assert ngram_propose([4, 5, 6, 4, 5], 8) == [6, 4, 5]  # cut at the end of the text
    # the longest tail wins over a more recent shorter one: [1, 2, 3, 4] was followed by 5, [2, 3, 4] last by 6
    assert ngram_propose([1, 2, 3, 4, 5, 8, 2, 3, 4, 6, 1, 2, 3, 4], 3) == [5, 8, 2]
    # a tail of n tokens earns at most n * n proposals
    assert ngram_propose([4, 5, 6, 7, 8, 9, 4], 8) == [5]
    assert ngram_propose([4, 5, 6, 7, 8, 9, 1, 4, 5], 8) == [6, 7, 8, 9]
    assert ngram_propose([3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5], 16) == [6, 7, 8, 9, 1, 2, 3, 4, 5]
    assert ngram_propose([4, 5, 4], 0) == [] and ngram_propose([4], 3) == []


def test_prompt_lookup_finds_what_trying_every_tail_length_finds():
    """The one pass over the last token's occurrences against the plain search: each tail length from the longest
    down, each occurrence most recent first."""

    def plain(tokens: list[int], k: int, max_n: int) -> list[int]:
        for n in range(min(max_n, len(tokens) - 1), 0, -1):
            for end in range(len(tokens) - 2, n - 2, -1):
                if tokens[end - n + 1 : end + 1] == tokens[len(tokens) - n :]:
                    return tokens[end + 1 : end + 1 + min(k, n * n)]
        return []

    g = torch.Generator().manual_seed(3)
    for _ in range(2000):
        size = int(torch.randint(0, 40, (1,), generator=g))
        tokens = torch.randint(0, int(torch.randint(1, 6, (1,), generator=g)), (size,), generator=g).tolist()
        k, max_n = int(torch.randint(0, 17, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
        assert ngram_propose(tokens, k, max_n) == plain(tokens, k, max_n), (tokens, k, max_n)


def test_adaptive_k_grows_while_accepted_and_shrinks_when_not():
    k = AdaptiveK()
    start = k.k
    k.update(start, start)
    assert k.k == 2 * start
    k.update(k.k, 0)
    assert k.k == start
    k.update(3, 1)
    assert k.k == 3  # accepted + 2
    k.update(0, 0)  # nothing proposed: nothing learned
    assert k.k == 3
    for _ in range(20):
        k.update(k.k, k.k)
    assert k.k == k.hi
    for _ in range(20):
        k.update(k.k, 0)
    assert k.k == 1
    fixed = AdaptiveK(fixed=5)
    fixed.update(5, 0)
    assert fixed.k == 5
    # prompt lookup bounds its proposals by the tail it matched, so its k starts at the most; a draft's at START_K
    assert AdaptiveK.of("ngram", None).k == MAX_DRAFTS and AdaptiveK.of("smollm2", None).k == START_K
    assert AdaptiveK.of("ngram", 3).k == 3


def test_greedy_verification_accepts_the_argmax_run_and_adds_the_model_token():
    logits = torch.full((4, 10), -5.0)
    for i, best in enumerate([7, 2, 4, 9]):
        logits[i, best] = 5.0
    greedy = SamplingParams()
    assert verify(logits, [7, 2, 4], greedy) == [7, 2, 4, 9]  # all accepted, and the next one
    assert verify(logits, [7, 3, 4], greedy) == [7, 2]  # the second disagrees: the model's token instead
    assert verify(logits[:1], [], greedy) == [7]
    # a repetition penalty sees the accepted run: token 7 penalised at the second position changes nothing here,
    # but a history that holds 2 makes position 1 pick its runner-up
    logits[1, 5] = 4.0
    assert verify(logits, [7, 2, 4], SamplingParams(repetition_penalty=3.0), history=[2]) == [7, 5]


def test_sampled_verification_keeps_the_distribution():
    """Each output token is distributed as the model's p, whatever was proposed: P(out = x) = p(d) [x = d] +
    (1 - p(d)) p(x) [x != d] / (1 - p(d)) = p(x). Checked on 6000 seeds per proposal, within 5 standard errors."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6) * 1.5
    params = SamplingParams(temperature=1.0)
    p = logits[0].softmax(-1)
    n = 6000
    for d in (int(p.argmax()), int(p.argmin())):
        counts = collections.Counter(verify(logits, [d], params, seed=s)[0] for s in range(n))
        for x in range(6):
            sigma = (p[x] * (1 - p[x]) / n) ** 0.5
            assert abs(counts[x] / n - p[x]) < 5 * sigma + 1e-3, (d, x, counts[x] / n, float(p[x]))
    # top-k: a proposal outside the kept tokens is never accepted
    outs = {verify(logits, [int(p.argmin())], SamplingParams(temperature=1.0, top_k=2), seed=s)[0] for s in range(200)}
    assert outs <= set(p.topk(2).indices.tolist())


def test_a_draft_proposes_its_greedy_continuation_and_keeps_what_its_cache_still_holds(tiny, drafts):
    draft = DraftModel(tiny[0])
    state = draft.state()
    p = repetitive_prompt(5)
    want = hf_greedy(tiny[1], p, 6)
    assert state.propose(p, 6) == want
    assert state.computed == len(p) + 5
    # two proposals accepted, then the chain's own token: only that token and the new proposals are computed
    h = p + want[:2] + [(want[2] + 1) % SPEC.vocab]
    before = state.computed
    assert state.propose(h, 3) == hf_greedy(tiny[1], h, 3)
    assert state.computed - before == 1 + 2
    # a conversation that is not a continuation starts again where the two part
    other = repetitive_prompt(6)
    assert state.propose(other, 2) == hf_greedy(tiny[1], other, 2)
    assert state.propose(p, 0) == []
    # the vocabulary and the tokenizer are checked against the chain's
    chain_tokenizer = Tokenizer.from_path(tiny[0])
    draft.check(chain_tokenizer, SPEC.vocab)
    DraftModel(drafts["other"]).check(chain_tokenizer, SPEC.vocab)
    with pytest.raises(CheckpointError, match="its tokenizer is not the chain's"):
        DraftModel(drafts["retokenized"]).check(chain_tokenizer, SPEC.vocab)
    with pytest.raises(CheckpointError, match="a vocabulary of 300 tokens, the chain's has 320"):
        DraftModel(drafts["small"]).check(chain_tokenizer, SPEC.vocab)
    with pytest.raises(CheckpointError, match="the stages serve no tokenizer"):
        draft.check(None, SPEC.vocab)


# ---- through stage servers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stages", list(SPLITS))
@pytest.mark.parametrize("server_loop", [True, False])
def test_speculative_greedy_equals_plain_greedy_and_transformers(tiny, routes, stages, server_loop):
    route = routes[stages]
    p = repetitive_prompt(1)
    want = hf_greedy(tiny[1], p, 40)
    before = infos(route)[-1]
    with Client(route, config=ClientConfig(server_loop=server_loop)) as client:
        plain = client.generate(p, max_new_tokens=40, stop_token_ids=[], stream=False)
        outs = {}
        for k in (None, 1, 3):
            with client.session() as s:
                outs[k] = s.generate(p, max_new_tokens=40, stop_token_ids=[], speculate="ngram", speculate_k=k)
                outs[k] = [piece.token_id for piece in outs[k]]
                if not server_loop:
                    assert s.drafted > 0 and 0 < s.accepted <= s.drafted
    after = infos(route)[-1]
    assert plain.token_ids == want
    for k, ids in outs.items():
        assert ids == want, k
    drafted = after.tokens_drafted - before.tokens_drafted
    accepted = after.tokens_accepted - before.tokens_accepted
    assert drafted > 0 and 0 < accepted <= drafted
    # every accepted proposal saved a pass through the chain: fewer steps than tokens
    assert after.tokens_sampled - before.tokens_sampled == 4 * 40
    assert after.steps_computed - before.steps_computed <= 4 * 40 - accepted


@pytest.mark.parametrize("server_loop", [True, False])
def test_limits_stops_and_the_conversation_hold_with_speculation(tiny, routes, server_loop):
    route, ref = routes["2"], tiny[1]
    p = repetitive_prompt(2)
    free = hf_greedy(ref, p, 30)
    opts = dict(speculate="ngram", speculate_k=6)
    with Client(route, config=ClientConfig(server_loop=server_loop)) as client:
        for n in (1, 2, 7):  # never more tokens than asked, even when a round would give more
            out = client.generate(p, max_new_tokens=n, stop_token_ids=[], stream=False, **opts)
            assert out.token_ids == free[:n] and out.finish_reason == "length"
        stop = free[12]  # a stop token inside an accepted run ends the generation right after it
        out = client.generate(p, max_new_tokens=30, stop_token_ids=[stop], stream=False, **opts)
        assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"
        with client.session(max_length=len(p) + 9) as s:  # max_length bounds the proposals too
            capped = s.generate(p, max_new_tokens=50, stop_token_ids=[], stream=False, **opts)
            assert capped.token_ids == free[:10] and capped.finish_reason == "length"
        # a conversation continued after speculative turns (stopped early, rejected proposals in the caches)
        # gives what the same conversation gives without speculation
        second = repetitive_prompt(3)[:5]
        turns = {}
        for spec in (opts, {}):
            with client.session() as s:
                a = s.generate(p, max_new_tokens=8, stop_token_ids=[], stream=False, **spec)
                b = s.generate(second, max_new_tokens=12, stop_token_ids=[], stream=False, **spec)
                turns[bool(spec)] = (a.token_ids, b.token_ids)
        assert turns[True] == turns[False]
        assert turns[False][1] == hf_greedy(ref, p + turns[False][0] + second, 12)


@pytest.mark.parametrize("which", ["itself", "other"])
def test_a_draft_model_gives_plain_greedy_tokens_through_the_chain(tiny, routes, drafts, which):
    """A draft run by the client (the chain's own checkpoint, which agrees with it, or another model with the
    same tokenizer, which mostly does not): the tokens are transformers' greedy ones either way, the client feeds
    every round (also with the server loop on), and a stop token or max_new_tokens cuts a round's run."""
    route, ref = routes["3"], tiny[1]
    path = tiny[0] if which == "itself" else drafts["other"]
    p = repetitive_prompt(7)
    want = hf_greedy(ref, p, 30)
    with Client(route) as client:
        with client.session() as s:
            out = s.generate(p, max_new_tokens=30, stop_token_ids=[], stream=False, speculate=path)
            assert out.token_ids == want
            assert s.drafted > 0
            if which == "itself":
                assert s.accepted == s.drafted  # the same model proposes what the chain then computes
            else:
                assert s.accepted < s.drafted
            # the conversation goes on: the draft's cache continues from what it holds
            more = s.generate([5, 6], max_new_tokens=10, stop_token_ids=[], stream=False, speculate=path)
            assert more.token_ids == hf_greedy(ref, p + want + [5, 6], 10)
        for n in (1, 4):
            out = client.generate(p, max_new_tokens=n, stop_token_ids=[], stream=False, speculate=path, speculate_k=6)
            assert out.token_ids == want[:n]
        stop = want[9]
        out = client.generate(p, max_new_tokens=30, stop_token_ids=[stop], stream=False, speculate=path)
        assert out.token_ids == want[: want.index(stop) + 1] and out.finish_reason == "stop"
        sampled = dict(max_new_tokens=16, temperature=0.8, seed=3, stop_token_ids=[], stream=False, speculate=path)
        a, b = client.generate(p, **sampled).token_ids, client.generate(p, **sampled).token_ids
        assert a == b and len(a) == 16


def test_a_draft_with_another_tokenizer_is_refused_and_the_chain_serves_on(tiny, routes, drafts):
    route = routes["2"]
    with Client(route) as client:
        for name, words in [("retokenized", "its tokenizer is not the chain's"), ("small", "vocabulary of 300")]:
            with pytest.raises(RPCError) as e:
                client.generate([5, 6, 7], speculate=drafts[name], stream=False)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and words in str(e.value)
        assert len(client.generate([5, 6, 7], max_new_tokens=3, stop_token_ids=[], stream=False).token_ids) == 3


def test_speculative_sampling_is_seeded_and_valid(tiny, routes):
    route = routes["3"]
    p = repetitive_prompt(4)
    sampled = dict(max_new_tokens=24, temperature=0.7, top_k=20, seed=11, stop_token_ids=[])
    with Client(route) as client:
        a = client.generate(p, stream=False, speculate="ngram", **sampled).token_ids
        b = client.generate(p, stream=False, speculate="ngram", **sampled).token_ids
    assert a == b and len(a) == 24 and all(0 <= t < SPEC.vocab for t in a)


def test_bad_speculation_is_refused_and_the_stage_serves_on(tiny, routes):
    route = routes["1"]
    with Client(route) as client:
        with pytest.raises(RPCError) as e:
            client.generate([5, 6, 7], speculate="draft-of-nothing", stream=False)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "speculate" in str(e.value)
        with pytest.raises(RPCError) as e:
            client.generate([5, 6, 7], speculate="ngram", speculate_k=0, stream=False)
        assert "speculate_k" in str(e.value)

    async def raw():
        async with connect(route) as stubs:
            (sid,) = await open_chain(stubs, route, 64)
            call = stubs[0].Push()
            cases = [
                (first_step(sid, [5, 6, 7], drafts=3), "drafts: 3 proposals in a step of 3 tokens"),
                (first_step(sid, [5, 6, 7], sample=False, drafts=1), "only a step that samples"),
                (first_step(sid, [5, 6, 7], propose=17), "propose: at most 16 proposals"),
                (first_step(sid, [5, 6, 7], sample=False, propose=2), "propose: only a one-row step that samples"),
                (
                    first_step(
                        sid,
                        [5, 6],
                        loop=stage_pb2.Loop(address=route[0], session_id=sid, max_new_tokens=4, speculate="lookahead"),
                    ),
                    "speculate must be one of",
                ),
            ]
            for seq, (step, words) in enumerate(cases, 1):
                step.seq = seq
                await call.write(step)
                reply = await asyncio.wait_for(call.read(), TIMEOUT)
                assert reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and words in reply.message, reply
            call.cancel()

    asyncio.run(asyncio.wait_for(raw(), 30))
    with Client(route) as client:  # and it serves on
        assert len(client.generate([5, 6, 7], max_new_tokens=3, stop_token_ids=[], stream=False).token_ids) == 3


# ---- a draft model on the first stage's host ----------------------------------------------------------------------


@pytest.mark.parametrize(("stages", "which"), [("1", "itself"), ("2", "itself"), ("3", "other")])
def test_a_draft_on_the_first_stages_host_gives_plain_greedy_tokens(tiny, stage_cluster, drafts, stages, which):
    """`layerline stage --draft`: the server loop asks the first stage for its draft's proposals each round
    (`Step.propose`); the tokens are transformers' greedy ones, the draft of the chain's own checkpoint has every
    proposal accepted, another model has some rejected (the caches roll back), and a round never passes
    max_new_tokens or a stop token; a conversation goes on from what the first stage knows of it."""
    path = tiny[0] if which == "itself" else drafts["other"]
    route, ref = stage_cluster(tiny[0], SPLITS[stages], "--draft", path), tiny[1]
    assert infos(route)[0].draft_model == path
    p = repetitive_prompt(8)
    want = hf_greedy(ref, p, 30)
    before = infos(route)
    with Client(route) as client:
        with client.session() as s:
            out = s.generate(p, max_new_tokens=30, stop_token_ids=[], stream=False, speculate="stage")
            assert out.token_ids == want
            more = s.generate([5, 6], max_new_tokens=10, stop_token_ids=[], stream=False, speculate="stage")
            assert more.token_ids == hf_greedy(ref, p + want + [5, 6], 10)
        after = infos(route)
        proposed = after[0].tokens_proposed - before[0].tokens_proposed
        drafted = after[-1].tokens_drafted - before[-1].tokens_drafted
        accepted = after[-1].tokens_accepted - before[-1].tokens_accepted
        assert proposed > 0 and drafted == proposed  # the last stage verified what the first proposed
        if which == "itself":
            assert accepted == drafted
        else:
            assert 0 <= accepted < drafted
        assert after[-1].steps_computed - before[-1].steps_computed <= 40 - accepted
        for n in (1, 4):
            out = client.generate(p, max_new_tokens=n, stop_token_ids=[], stream=False, speculate="stage")
            assert out.token_ids == want[:n]
        stop = want[9]
        out = client.generate(p, max_new_tokens=30, stop_token_ids=[stop], stream=False, speculate="stage")
        assert out.token_ids == want[: want.index(stop) + 1] and out.finish_reason == "stop"


def test_speculating_on_a_first_stage_without_a_draft_is_refused_up_front(tiny, routes):
    route = routes["2"]
    assert infos(route)[0].draft_model == ""
    with Client(route) as client:
        with pytest.raises(RPCError) as e:
            client.generate([5, 6, 7], speculate="stage", stream=False)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--draft" in str(e.value)
    with Client(route, config=ClientConfig(server_loop=False)) as client:
        with pytest.raises(RPCError) as e:
            client.generate([5, 6, 7], speculate="stage", stream=False)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "server loop" in str(e.value)
        assert len(client.generate([5, 6, 7], max_new_tokens=3, stop_token_ids=[], stream=False).token_ids) == 3


@pytest.mark.parametrize(("name", "words"), [("retokenized", "its tokenizer is not the chain's"), ("small", "300")])
def test_a_stage_with_a_draft_of_another_tokenizer_does_not_start(tiny, drafts, name, words):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "layerline.cli", "stage", "--model", tiny[0], "--layers", "0:4", "--port", "0"]
        + ["--draft", drafts[name]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and words in done.stderr and "draft" in done.stderr, done.stderr[-2000:]


def test_a_step_asking_for_proposals_gets_them_from_a_first_stage_with_a_draft_only(tiny, routes, stage_cluster):
    """`Step.propose` on the wire: a first stage with a draft (the chain's own checkpoint) appends that many of its
    proposals, and the last stage answers them all accepted and one token more; a first stage without a draft sends
    the step on as it came (one token: always correct)."""
    p = repetitive_prompt(9)
    want = hf_greedy(tiny[1], p, 5)
    with_draft = stage_cluster(tiny[0], SPLITS["2"], "--draft", tiny[0])

    async def ask(route: list[str]) -> stage_pb2.Result:
        async with connect(route) as stubs:
            ids = await open_chain(stubs, route, 64)
            async with probe(stubs[0], stubs[-1], ids[-1]) as pr:
                await pr.send(first_step(ids[0], p, propose=4))
                kind, result = await pr.next()
                assert kind == "result", (kind, result)
                return result

    plain = asyncio.run(asyncio.wait_for(ask(routes["2"]), 60))
    assert list(plain.token_ids) == want[:1] and plain.drafted == 0
    drafted = asyncio.run(asyncio.wait_for(ask(with_draft), 60))
    assert drafted.drafted == 4 and list(drafted.token_ids) == want
