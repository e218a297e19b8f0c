"""`layerline api` as a user runs it (a subprocess over two stage servers, real gRPC and HTTP on 127.0.0.1), driven
by the official `openai` client: models, completions and chat completions, streamed (server-sent events) and not,
n, seed, stop, usage; OpenAI-style errors for bad requests; an API key; a caller that leaves a stream frees its
sessions on the stages. The oracle is transformers' greedy continuation, decoded by transformers' tokenizer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
import torch
from stage_wire import infos
from transformers import AutoTokenizer

from layerline.local_cluster import LocalApi, LocalCluster
from layerline.v1 import stage_pb2, stage_pb2_grpc
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=4)
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    folder, ref = tiny_checkpoint(SPEC)
    with LocalCluster(folder, [(0, 2), (2, 4)], threads=1) as stages, LocalApi(route=stages.route) as api:
        yield folder, ref, stages, api


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster[3].url + "/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def oracle(cluster, ids: list[int], n: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of transformers' greedy continuation, ended at the tokenizer's
    end-of-sequence token as a server ends it."""
    folder, ref = cluster[0], cluster[1]
    tok = AutoTokenizer.from_pretrained(folder)
    out = hf_greedy(ref, ids, n)
    eos = tok.convert_tokens_to_ids(EOS)
    finish = "length"
    if eos in out:
        out, finish = out[: out.index(eos) + 1], "stop"
    return tok.decode(out, skip_special_tokens=True), finish, len(out)


def prompt_ids(cluster, text: str) -> list[int]:
    return AutoTokenizer.from_pretrained(cluster[0])(text)["input_ids"]


def chat_ids(cluster, messages: list[dict]) -> list[int]:
    tok = AutoTokenizer.from_pretrained(cluster[0])
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def open_sessions(stages) -> list[int]:
    out = []
    for address in stages.route:
        with grpc.insecure_channel(address) as channel:
            out.append(stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10).open_sessions)
    return out


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_a_server_side_speculation_default_keeps_the_answers(cluster, method):
    """`layerline api --speculate ngram` (prompt lookup) or `--speculate PATH` (a draft model, here the served
    checkpoint itself): greedy answers are unchanged and the last stage verified proposals."""
    _, _, stages, _ = cluster
    prompt = "one two three one two three one two"
    with LocalApi(route=stages.route, extra_args=["--speculate", "ngram" if method == "ngram" else cluster[0]]) as api:
        fast = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", timeout=60, max_retries=0)
        name = fast.models.list().data[0].id
        before = infos(stages.route)[-1].tokens_drafted
        out = fast.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
        assert out.choices[0].text == oracle(cluster, prompt_ids(cluster, prompt), 16)[0]
        assert infos(stages.route)[-1].tokens_drafted > before


def test_models(client, cluster):
    models = client.models.list().data
    name = os.path.basename(cluster[0])  # the checkpoint's folder name
    assert [m.id for m in models] == [name]
    assert client.models.retrieve(name).owned_by == "layerline"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_transformers_and_counts_usage(client, model, cluster):
    prompt = "the capital of france is"
    ids = prompt_ids(cluster, prompt)
    text, finish, count = oracle(cluster, ids, 12)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == model and out.id.startswith("cmpl-")
    assert [c.text for c in out.choices] == [text]
    assert out.choices[0].finish_reason == finish
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), count)
    assert out.usage.total_tokens == len(ids) + count
    # token ids as the prompt, and a batch of prompts: one choice each, in order
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text
    other = "hello world"
    both = client.completions.create(model=model, prompt=[prompt, other], max_tokens=6, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [
        oracle(cluster, ids, 6)[0],
        oracle(cluster, prompt_ids(cluster, other), 6)[0],
    ]


def test_streamed_completion_is_the_same_text_with_usage_at_the_end(client, model, cluster):
    prompt = "numbers 0123"
    text, finish, count = oracle(cluster, prompt_ids(cluster, prompt), 10)
    chunks = list(
        client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == finish and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count
    assert len(chunks) >= 3  # it streamed, not one block


def test_chat_completion_streamed_and_not(client, model, cluster):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    text, finish, count = oracle(cluster, chat_ids(cluster, messages), 16)
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == finish
    assert out.usage.prompt_tokens == len(chat_ids(cluster, messages)) and out.usage.completion_tokens == count
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish
    # content given as text parts, and the developer role (a system message)
    parts = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]},
    ]
    again = client.chat.completions.create(model=model, messages=parts, max_tokens=16, temperature=0)
    assert again.choices[0].message.content == text


def test_n_seed_and_stop(client, model, cluster):
    sampled = dict(model=model, prompt="hello", max_tokens=12, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**sampled)
    b = client.completions.create(**sampled)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the same seed, the same choices
    assert len({c.text for c in a.choices}) > 1  # each choice has a seed of its own
    assert 3 <= a.usage.completion_tokens <= 3 * 12 and a.usage.prompt_tokens == len(prompt_ids(cluster, "hello"))
    streamed = client.completions.create(**sampled, stream=True)
    texts = {0: "", 1: "", 2: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[i] for i in range(3)] == [c.text for c in a.choices]
    # the prompt counts once however many choices, in chat completions too (as OpenAI counts it)
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=1.0, seed=7, n=2)
    assert len(chat.choices) == 2 and chat.usage.prompt_tokens == len(chat_ids(cluster, messages))
    # a stop string: the text ends before it, finish_reason "stop"
    full, _, _ = oracle(cluster, prompt_ids(cluster, "the capital"), 16)
    cut = full[3:6]
    assert cut and cut in full
    out = client.completions.create(model=model, prompt="the capital", max_tokens=16, temperature=0, stop=[cut])
    assert out.choices[0].text == full[: full.index(cut)] and out.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors(client, model, cluster):
    bad = [
        dict(max_tokens=0),
        dict(temperature=5),
        dict(top_p=0),
        dict(n=100),
        dict(logprobs=21),
        dict(logprobs=-1),
        dict(echo="yes"),
        dict(extra_body={"top_logprobs": 2}),
        dict(presence_penalty=1.0),
        dict(stop=["a", "b", "c", "d", "e"]),
        dict(max_tokens=100_000),
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt="hello", **{"max_tokens": 4, **extra})
        body = e.value.body
        asked = extra.get("extra_body", extra)
        assert body["type"] == "invalid_request_error" and body["param"] in asked, (extra, body)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}])
    assert "role" in e.value.message
    hi = [{"role": "user", "content": "hi"}]
    for extra, param in [
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(logprobs=3), "logprobs"),
        (dict(extra_body={"echo": True}), "echo"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=hi, max_tokens=2, **extra)
        assert e.value.body["param"] == param, (extra, e.value.body)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hello", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    url = cluster[3].url
    status, body = post(url + "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = post(
        url + "/v1/completions", json.dumps({"model": model, "prompt": "x", "max_tokens": "8"}).encode()
    )
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = post(url + "/v1/nowhere", b"{}")
    assert status == 404 and "no such endpoint" in body["error"]["message"]
    # after all of that it still answers
    assert client.completions.create(model=model, prompt="hello", max_tokens=2, temperature=0).choices


def log_softmax(cluster, ids: list[int]) -> torch.Tensor:
    """transformers' float32 log-probabilities over the checkpoint: row i is the distribution of token i + 1."""
    with torch.no_grad():
        logits = cluster[1](torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_echo_with_logprobs_scores_prompts_as_transformers(client, model, cluster):
    """What lm-evaluation-harness asks of a completions endpoint: echo + logprobs + max_tokens 0, for a string, a
    list of strings and token ids; the prompt's first token has no log-probability."""
    tok = AutoTokenizer.from_pretrained(cluster[0])
    texts = ["the capital of france is paris", "hello world, this is a tiny model"]
    for prompt in (texts[0], texts, prompt_ids(cluster, texts[1])):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
        prompts = prompt if isinstance(prompt, list) and isinstance(prompt[0], str) else [prompt]
        assert len(out.choices) == len(prompts) and out.usage.completion_tokens == 0
        for choice, given in zip(out.choices, prompts, strict=True):
            ids = prompt_ids(cluster, given) if isinstance(given, str) else given
            assert choice.text == (given if isinstance(given, str) else tok.decode(ids))
            lp, want = choice.logprobs, log_softmax(cluster, ids)
            assert lp.tokens == [tok.decode([t]) for t in ids]
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            assert lp.token_logprobs[1:] == pytest.approx([float(want[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)
            for i in range(1, len(ids)):
                best = want[i - 1].topk(3)
                expected = {
                    tok.decode([t]): v for t, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)
                }
                assert lp.top_logprobs[i] == pytest.approx(expected, abs=1e-4)
            assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


def test_generated_tokens_logprobs_in_completions_and_chat_streamed_and_not(client, model, cluster):
    tok = AutoTokenizer.from_pretrained(cluster[0])
    prompt = "the capital of france is"
    ids = prompt_ids(cluster, prompt)
    text, _, count = oracle(cluster, ids, 6)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text == prompt + text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + count
    new_ids = hf_greedy(cluster[1], ids, count)
    want = log_softmax(cluster, ids + new_ids)
    assert lp.token_logprobs[len(ids) :] == pytest.approx(
        [float(want[len(ids) - 1 + i, t]) for i, t in enumerate(new_ids)], abs=1e-4
    )
    streamed = client.completions.create(
        model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, stream=True
    )
    tokens, values = [], []
    for c in streamed:
        if c.choices and c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            values += c.choices[0].logprobs.token_logprobs
    assert tokens == lp.tokens[len(ids) :] and values == pytest.approx(lp.token_logprobs[len(ids) :], abs=1e-6)
    # chat: logprobs true and top_logprobs, per content token
    messages = [{"role": "user", "content": "hello"}]
    cids = chat_ids(cluster, messages)
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    new_ids = hf_greedy(cluster[1], cids, len(content))
    want = log_softmax(cluster, cids + new_ids)
    for i, (entry, t) in enumerate(zip(content, new_ids, strict=True)):
        assert entry.token == tok.decode([t]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(float(want[len(cids) - 1 + i, t]), abs=1e-4)
        best = want[len(cids) - 1 + i].topk(2)
        assert [a.token for a in entry.top_logprobs] == [tok.decode([x]) for x in best.indices.tolist()]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0, logprobs=True, stream=True
    )
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in streamed)
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_a_caller_leaving_a_stream_frees_its_sessions(client, model, cluster):
    stages = cluster[2]
    stream = client.completions.create(model=model, prompt="hello", max_tokens=400, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while open_sessions(stages) != [0, 0]:
        assert time.monotonic() < deadline, open_sessions(stages)
        time.sleep(0.1)


def test_health_metrics_and_cluster_json(client, model, cluster):
    url, stages = cluster[3].url, cluster[2]
    client.completions.create(model=model, prompt="hello", max_tokens=3, temperature=0)
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read())["route"] == stages.route
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'layerline_api_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'layerline_api_tokens_total{kind="completion"}' in text
    deadline = time.monotonic() + 10
    while True:  # the api process samples the cluster every second: the completion shows within one
        with urllib.request.urlopen(url + "/api/cluster", timeout=10) as r:
            snap = json.loads(r.read())
        if snap["stages"] and snap["stages"][-1].get("tokens_sampled") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert snap["num_layers"] == SPEC.layers and snap["route"] == stages.route
    assert [(s["address"], s["start"], s["end"]) for s in snap["stages"]] == [
        (stages.route[0], 0, 2),
        (stages.route[1], 2, 4),
    ]
    assert all(s["healthy"] and s["ready"] for s in snap["stages"])
    assert snap["stages"][1]["tokens_sampled"] > 0


def test_an_api_key_is_required_when_set(cluster, tmp_path, model):
    key = tmp_path / "key"
    key.write_text("sk-layerline-test\n")
    with LocalApi(route=cluster[2].route, extra_args=["--api-key-file", str(key)]) as api:
        wrong = openai.OpenAI(base_url=api.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=api.url + "/v1", api_key="sk-layerline-test", max_retries=0)
        assert right.completions.create(model=model, prompt="hello", max_tokens=2, temperature=0).choices


def test_a_port_taken_or_no_cluster_is_a_clear_error(cluster):
    route = ",".join(cluster[2].route)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        out = subprocess.run(
            [sys.executable, "-m", "layerline.cli", "api", "--route", route, "--port", port],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr and "port taken" in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerline.cli",
            "api",
            "--coordinator",
            "127.0.0.1:1",
            "--port",
            "0",
            "--connect-timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "cannot reach the cluster through the coordinator at 127.0.0.1:1" in out.stderr
    assert "waiting for the cluster" in out.stderr  # it waited (a cluster starting up has no route for a while)
    assert "Traceback" not in out.stderr


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_without_its_cluster_the_api_listens_at_once_and_answers_503_with_the_reason():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["api", "--coordinator", "127.0.0.1:1", "--port", str(port), "--connect-timeout", "60"]
    p = subprocess.Popen([sys.executable, "-m", "layerline.cli", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                code, body = _get(f"http://127.0.0.1:{port}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                assert p.poll() is None, p.communicate()[1]
                assert time.monotonic() < deadline, "the API did not open its port"
                time.sleep(0.2)
        assert code == 503 and body["status"] == "unavailable" and "127.0.0.1:1" in body["problem"], body
        code, body = _get(f"http://127.0.0.1:{port}/v1/models")
        assert code == 503 and body["error"]["code"] == "unavailable", body
        assert "not there yet" in body["error"]["message"] and "127.0.0.1:1" in body["error"]["message"]
        # a gRPC client pointed at the API's port by mistake: an error for it, one warning line in the API's log
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError):
                stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=5)
        code, body = _get(f"http://127.0.0.1:{port}/health")
        assert code == 503  # and the API goes on answering
    finally:
        p.terminate()
        err = p.communicate(timeout=30)[1]
    assert "WARNING aiohttp.server: Error handling request from 127.0.0.1: not an HTTP/1.1 request (an HTTP/2" in err
    assert "Traceback" not in err and "ERROR" not in err, err


def test_health_follows_the_route_within_seconds(cluster):
    folder = cluster[0]
    with LocalCluster(folder, [(0, SPEC.layers)], threads=1) as stages, LocalApi(route=stages.route) as api:
        code, body = _get(api.url + "/health")
        assert code == 200 and body["route"] == stages.route
        stages.processes[0].kill()
        stages.processes[0].wait(10)
        code, body = _get(api.url + "/health")  # the next check already knows: no cached answer
        assert code == 503 and stages.route[0] in body["problem"], body
