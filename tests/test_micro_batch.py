"""The micro-batch flows (`generate_batch`, `score`) and the bounds on work in flight: micro-batches of several rows
give what each sequence gives alone (and what transformers gives); a stage never queues more steps than its bound;
a slow reader pauses its generation loop instead of growing the stage's memory; concurrent sessions all progress."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from stage_wire import KEY, TIMEOUT, close_session, connect, open_chain, probe

from layerline import wire
from layerline.client import AsyncClient, Client, ClientConfig, RPCError
from layerline.v1 import stage_pb2, stage_pb2_grpc
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=4, kv_heads=2)
TEST_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint(SPEC)


@pytest.fixture(scope="module")
def route(tiny, stage_cluster) -> list[str]:
    return stage_cluster(tiny[0], [(0, 2), (2, 4)])


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 300, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


def hf_logprobs(model, seq: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return [float(lp[i, seq[i + 1]]) for i in range(len(seq) - 1)]


@pytest.mark.parametrize("server_loop", [True, False], ids=["server-loop", "client-loop"])
def test_generate_batch_equals_each_prompt_alone_and_transformers(tiny, route, server_loop):
    ps = prompts(7)
    with Client(route, config=ClientConfig(server_loop=server_loop)) as client:
        batched = client.generate_batch(ps, micro_batch_size=3, max_new_tokens=9, stop_token_ids=[])
        alone = [client.generate(p, max_new_tokens=9, stop_token_ids=[], stream=False) for p in ps]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.text for g in batched] == [g.text for g in alone]
    for g, p in zip(batched, ps, strict=True):
        assert g.prompt_token_ids == p and g.finish_reason == "length"
        assert g.token_ids == hf_greedy(tiny[1], p, 9)


def test_generate_batch_rows_stop_on_their_own(tiny, route):
    ps = prompts(5, seed=3)
    with Client(route) as client:
        free = client.generate_batch(ps, micro_batch_size=5, max_new_tokens=8, stop_token_ids=[])
        # each row's own 3rd token as a stop id: rows end at different steps, each exactly where it would alone
        stops = sorted({g.token_ids[2] for g in free})
        got = client.generate_batch(ps, micro_batch_size=5, max_new_tokens=8, stop_token_ids=stops)
        want = [client.generate(p, max_new_tokens=8, stop_token_ids=stops, stream=False) for p in ps]
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.finish_reason for g in got] == [g.finish_reason for g in want]
    assert all(len(g.token_ids) <= 3 and g.finish_reason == "stop" for g in got)


@pytest.mark.parametrize("chunk", [512, 4], ids=["one-step", "chunked"])
def test_score_equals_transformers_log_probabilities(tiny, route, chunk):
    seqs = [p + [7, 8, 9] for p in prompts(6, seed=1)] + [[5]]
    with Client(route, config=ClientConfig(prefill_chunk=chunk)) as client:
        scored = client.score(seqs, micro_batch_size=4)
    assert [len(s) for s in scored] == [len(s) - 1 for s in seqs]
    for s, got in zip(seqs, scored, strict=True):
        want = hf_logprobs(tiny[1], s)
        assert max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0.0) < 1e-4


def test_micro_batch_input_errors(route):
    with Client(route) as client:
        for call, args, words in [
            (client.score, ([],), "empty"),
            (client.score, ("abc",), "list"),
            (client.score, ([[1, 2], []],), "at least one token"),
            (client.score, ([[1, 10**6]],), "token ids must be in"),
            (client.generate_batch, ([[1, 2]],), "micro_batch_size"),
        ]:
            kw = {"micro_batch_size": 0} if call == client.generate_batch else {}
            with pytest.raises(RPCError) as e:
                call(*args, **kw)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in str(e.value), (words, e.value)
        # the stages keep serving
        assert client.score([[1, 2, 3]])[0]


def test_bad_targets_are_refused_and_the_stage_keeps_serving(route):
    async def main():
        async with connect(route) as stubs:
            ids = await open_chain(stubs, route, 16)
            pos = wire.encode(torch.arange(3)[None])
            toks = wire.encode(torch.tensor([[4, 5, 6]]))

            def step(targets, positions=pos, **kw) -> stage_pb2.Step:
                return stage_pb2.Step(
                    session_id=ids[0],
                    positions=positions,
                    tokens=toks,
                    targets=wire.encode(targets),
                    client_key=KEY,
                    **kw,
                )

            bad = [
                (step(torch.tensor([[1, 2]])), "targets have shape"),
                (step(torch.tensor([[1, 2, 10**6]])), "targets must be token ids"),
                (step(torch.tensor([[1.0, 2.0, 3.0]])), "targets: dtype float32"),
                (step(torch.tensor([[5, 6, -1]]), wire.encode(torch.tensor([[-1, 0, 1]]))), "padding position"),
                (
                    step(
                        torch.tensor([[5, 6, -1]]),
                        sample=True,
                        loop=stage_pb2.Loop(address="x:1", session_id="y", max_new_tokens=2),
                    ),
                    "cannot start a generation loop",
                ),
            ]
            async with probe(stubs[0], stubs[-1], ids[-1]) as p:
                for msg, words in bad:
                    await p.rejected(msg, grpc.StatusCode.INVALID_ARGUMENT, "layers 0:2", words)
                seq = await p.send(step(torch.tensor([[5, 6, -1]])))
                kind, result = await p.next()
                assert kind == "result" and result.seq == seq and list(result.logprobs.shape) == [1, 3], result
                lp = wire.decode(result.logprobs, "logprobs")
                assert bool((lp[0, :2] < 0).all()) and float(lp[0, 2]) == 0.0
            for stub, sid in zip(stubs, ids, strict=True):
                assert await close_session(stub, sid)

    run(main())


def info(address: str) -> stage_pb2.StageInfo:
    with grpc.insecure_channel(address) as ch:
        return stage_pb2_grpc.StageStub(ch).Info(stage_pb2.InfoRequest(), timeout=TIMEOUT)


def test_a_stage_never_queues_more_steps_than_its_bound(tiny, stage_cluster):
    bounded = stage_cluster(tiny[0], [(0, 2), (2, 4)], "--max-queued-steps", "2")
    ps = prompts(4, seed=5)
    # one-token prefill steps pushed back to back by 4 sessions at once: far more than 2 waiting at a time
    with Client(bounded, config=ClientConfig(prefill_chunk=1)) as client:

        async def all_at_once():
            return await asyncio.gather(
                *(client._aio.generate(p + p + p, max_new_tokens=4, stop_token_ids=[], stream=False) for p in ps)
            )

        got = client._loop.run(all_at_once())
    infos = [info(a) for a in bounded]
    assert all(i.max_queued_steps == 2 for i in infos)
    assert all(1 <= i.peak_queued_steps <= 2 for i in infos), [i.peak_queued_steps for i in infos]
    assert max(i.peak_queued_steps for i in infos) == 2  # the bound was reached, and held
    assert all(i.queued_steps == 0 for i in infos)
    assert [g.token_ids for g in got] == [hf_greedy(tiny[1], p + p + p, 4) for p in ps]


def test_a_reader_that_falls_behind_pauses_its_loop_instead_of_growing_the_stage(tiny, stage_cluster):
    route = stage_cluster(tiny[0], [(0, 2), (2, 4)], "--loop-ahead", "4")
    p = prompts(1, seed=7)[0]
    n = 60

    async def main():
        async with connect(route) as stubs:
            ids = await open_chain(stubs, route, len(p) + n + 1)
            push = stubs[0].Push()
            step = stage_pb2.Step(
                session_id=ids[0],
                client_key=KEY,
                seq=1,
                positions=wire.encode(torch.arange(len(p))[None]),
                tokens=wire.encode(torch.tensor([p])),
                sample=True,
                loop=stage_pb2.Loop(address=route[0], session_id=ids[0], max_new_tokens=n),
            )
            await push.write(step)
            # nobody reads the session's results yet: the loop must stop after about loop_ahead tokens
            last = route[-1]
            before = info(last).steps_computed
            await asyncio.sleep(1.0)
            paused = info(last).steps_computed
            await asyncio.sleep(0.5)
            assert info(last).steps_computed == paused  # not running on
            assert paused - before <= 4 + 2, paused - before
            assert info(last).peak_queued_results <= 4 + 1
            tokens = []
            async for result in stubs[-1].Subscribe(stage_pb2.SubscribeRequest(session_id=ids[-1], client_key=KEY)):
                tokens.extend(result.token_ids)
                await asyncio.sleep(0.01)  # a slow reader: the loop follows its pace
                if result.done:
                    break
            push.cancel()
            return tokens

    tokens = run(main())
    assert tokens == hf_greedy(tiny[1], p, n)
    assert info(route[-1]).peak_queued_results <= 4 + 1


def test_concurrent_sessions_all_progress_and_the_client_bound_holds(tiny, route):
    ps = prompts(5, seed=9)

    async def main():
        async with AsyncClient(route, config=ClientConfig(max_in_flight=2)) as client:
            seen, stop = [], asyncio.Event()

            async def watch():
                while not stop.is_set():
                    seen.append((await asyncio.to_thread(info, route[-1])).open_sessions)
                    await asyncio.sleep(0.005)

            async def timed(p, n):
                out = await client.generate(p, max_new_tokens=n, stop_token_ids=[], stream=False)
                return out, time.monotonic()

            base = (await asyncio.to_thread(info, route[-1])).open_sessions  # other tests' sessions still open
            watcher = asyncio.create_task(watch())
            long = asyncio.create_task(timed(ps[0], 80))
            await asyncio.sleep(0.05)
            short = [asyncio.create_task(timed(p, 6)) for p in ps[1:]]
            results = await asyncio.gather(long, *short)
            stop.set()
            await watcher
            return results, [n - base for n in seen]

    results, seen = run(main())
    assert max(seen) <= 2, max(seen)  # the client's in-flight bound: two sessions at a time
    (long_out, long_end), *shorts = results
    # the short generations share the stages with the long one instead of waiting for it to finish
    assert all(end < long_end for _, end in shorts)
    for (out, _), p, n in zip(results, ps, [80, 6, 6, 6, 6], strict=True):
        assert out.token_ids == hf_greedy(tiny[1], p, n)


def test_cli_generate_file_and_score(tiny, route, tmp_path, capsys):
    import json

    from layerline.cli import main

    texts = ["hello there", "the cat sat on the mat", "a"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(texts[:2]) + "\n\n" + texts[2] + "\n")
    args = ["--route", ",".join(route), "--file", str(f), "--micro-batch-size", "2"]
    assert main(["generate", *args, "--raw", "--max-new-tokens", "5", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with Client(route) as client:
        want = [client.generate(t, max_new_tokens=5, stream=False) for t in texts]
        tok = client.tokenizer()
        scores = client.score([tok.encode(t) for t in texts])
    assert [x["prompt"] for x in lines] == texts
    assert [x["token_ids"] for x in lines] == [g.token_ids for g in want]
    assert main(["score", *args, "--json"]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in scored] == texts
    for x, lps in zip(scored, scores, strict=True):
        assert x["logprobs"] == pytest.approx(lps, abs=1e-5) and x["total"] == pytest.approx(sum(lps), abs=1e-4)
    # mistakes: a clear one-line error and status 2
    assert main(["score", "--route", ",".join(route)]) == 2
    assert "give either a text or --file" in capsys.readouterr().err
    assert main(["score", "--route", ",".join(route), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --file" in capsys.readouterr().err
    assert main(["generate", "--route", ",".join(route), "--file", str(f), "also a prompt"]) == 2
    assert "give either a prompt or --file" in capsys.readouterr().err
