"""Request-rate limits per key: the token bucket's decisions under an injected clock, the API's 429 with
Retry-After for one key's burst while another key's requests go through, and a stage's RESOURCE_EXHAUSTED for one
client key's OpenSession burst while another client opens sessions untouched. The limits in the process tests
refill once an hour, so what passes and what is refused does not depend on how fast this machine is."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest

from layerline.client import Client, RPCError
from layerline.local_cluster import LocalApi
from layerline.rate_limit import RateLimiter, parse_rate
from tiny_models import TinySpec


def test_buckets_refill_at_the_rate_and_keys_do_not_share():
    now = [100.0]
    limiter = RateLimiter(parse_rate("2/s"), clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(2)] == [0.0, 0.0]  # a burst of the rate's count
    assert limiter.acquire("a") == pytest.approx(0.5)  # empty: half a second to the next token
    assert limiter.acquire("b") == 0.0  # another key has its own bucket
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0 and limiter.acquire("a") > 0
    now[0] += 60  # a long pause fills the bucket only to its burst
    third = [limiter.acquire("a") for _ in range(3)]
    assert third[:2] == [0.0, 0.0] and third[2] > 0 and limiter.refused == 3
    slow = RateLimiter(parse_rate("30/min"), burst=1, clock=lambda: now[0])
    assert slow.acquire("k") == 0.0 and slow.acquire("k") == pytest.approx(2.0)
    assert parse_rate("0.5/h").per_second == pytest.approx(0.5 / 3600)
    for bad in ("10", "0/s", "-1/s", "5/week", "x/s", ""):
        with pytest.raises(ValueError, match="N/s, N/min or N/h"):
            parse_rate(bad)


def completion(url: str, key: str) -> tuple[int, dict, dict]:
    body = json.dumps({"model": "m", "prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(
        url + "/v1/completions", body, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_one_keys_burst_is_refused_with_retry_after_and_another_key_goes_through(
    tiny_checkpoint, stage_cluster, tmp_path
):
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=2))
    route = stage_cluster(folder, [(0, 1), (1, 2)])
    keys = tmp_path / "keys"
    keys.write_text("key-one\nkey-two\n")
    args = ["--rate-limit", "3/h", "--api-key-file", str(keys), "--model-name", "m"]
    with LocalApi(route=route, extra_args=args) as api:
        first = [completion(api.url, "key-one") for _ in range(3)]
        assert [s for s, _, _ in first] == [200, 200, 200]
        status, headers, body = completion(api.url, "key-one")
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert body["error"]["code"] == "rate_limit_exceeded" and "3/h requests per API key" in body["error"]["message"]
        assert [completion(api.url, "key-two")[0] for _ in range(3)] == [200, 200, 200]  # untouched
        assert completion(api.url, "not-a-key")[0] == 401  # a wrong key is refused before it is counted


def test_a_stage_limits_open_sessions_per_client_key(tiny_checkpoint, stage_cluster):
    folder, _ = tiny_checkpoint(TinySpec("llama", layers=2))
    route = stage_cluster(folder, [(0, 2)], "--rate-limit", "2/h")
    with Client(route) as burst, Client(route) as other:
        for _ in range(2):
            assert len(burst.generate([5, 6], max_new_tokens=2, stop_token_ids=[], stream=False).token_ids) == 2
        with pytest.raises(RPCError) as e:
            burst.generate([5, 6], max_new_tokens=2, stream=False)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit: at most 2/h OpenSession calls per client key" in str(e.value)
        assert len(other.generate([5, 6], max_new_tokens=2, stop_token_ids=[], stream=False).token_ids) == 2


def test_a_bad_rate_is_a_usage_error():
    for cmd in (["stage", "--model", "smollm2", "--layers", "0:1"], ["api", "--route", "127.0.0.1:1"]):
        out = subprocess.run(
            [sys.executable, "-m", "layerline.cli", *cmd, "--rate-limit", "fast"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and "a rate is N/s, N/min or N/h" in out.stderr, out.stderr
