"""Metrics, health, reflection and logs, as operators meet them (stage servers and a coordinator in subprocesses on
127.0.0.1): Prometheus /metrics on stages and coordinator count what happened (tokens, steps, passes, sessions, KV
bytes, errors by status code); gRPC reflection describes the services as grpcurl needs; --log-format json writes one
JSON object per line carrying the session a record is about."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from layerline.client import Client
from layerline.local_cluster import LocalCluster, LocalCoordinator
from layerline.v1 import stage_pb2, stage_pb2_grpc
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=4)
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]


def scrape(address: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample on http://address/metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@pytest.fixture(scope="module")
def stages(tiny_checkpoint):
    folder, ref = tiny_checkpoint(SPEC)
    env = {"LAYERLINE_LOG_LEVEL": "INFO", "LAYERLINE_LOG_FORMAT": "json"}
    with LocalCluster(folder, [(0, 2), (2, 4)], threads=1, extra_args=["--metrics-port", "0"], env=env) as c:
        yield c, ref


def test_stage_metrics_count_what_happened(stages):
    cluster, ref = stages
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", m) for m in cluster.metrics), cluster.metrics
    before = [scrape(m) for m in cluster.metrics]
    with Client(cluster.route) as client:
        out = client.generate(PROMPT, max_new_tokens=10, stop_token_ids=[], stream=False)
    assert out.token_ids == hf_greedy(ref, PROMPT, 10)
    after = [scrape(m) for m in cluster.metrics]
    sampled = 'layerline_stage_tokens_total{kind="sampled"}'
    computed = 'layerline_stage_tokens_total{kind="computed"}'
    assert after[1][sampled] - before[1][sampled] == 10
    assert after[0][sampled] == 0  # only the last stage samples
    for b, a, (start, end) in zip(before, after, [(0, 2), (2, 4)], strict=True):
        assert a[computed] - b[computed] == len(PROMPT) + 9  # the prompt, then one position per fed-back token
        assert a["layerline_stage_steps_total"] - b["layerline_stage_steps_total"] == 10  # 1 prefill + 9 decode
        assert a["layerline_stage_pass_seconds_count"] - b["layerline_stage_pass_seconds_count"] >= 1
        assert a["layerline_stage_pass_seconds_sum"] > b["layerline_stage_pass_seconds_sum"]
        assert a["layerline_stage_step_seconds_count"] - b["layerline_stage_step_seconds_count"] == 10
        assert a['layerline_stage_step_seconds_bucket{le="+Inf"}'] == a["layerline_stage_step_seconds_count"]
        assert a['layerline_stage_rpcs_total{code="OK",method="OpenSession"}'] >= 1
        assert (a['layerline_stage_layers{bound="start"}'], a['layerline_stage_layers{bound="end"}']) == (start, end)
        assert a["layerline_stage_open_sessions"] == 0 and a["layerline_stage_kv_bytes_used"] == 0
        assert a["layerline_stage_kv_bytes_budget"] > 0 and a["layerline_stage_queue_depth"] == 0
        # the paged cache: nothing held now; the session's full blocks (the first generation here) stay cached
        blocks = {s: a[f'layerline_stage_kv_blocks{{state="{s}"}}'] for s in ("used", "cached", "free")}
        was = {s: b[f'layerline_stage_kv_blocks{{state="{s}"}}'] for s in ("used", "cached", "free")}
        assert blocks["used"] == 0 and blocks["cached"] - was["cached"] == (len(PROMPT) + 9) // 16
        assert sum(blocks.values()) == sum(was.values()) > 0
        assert a["layerline_stage_prefix_hit_tokens_total"] == 0
    # errors, by status code: a session opened without a client key, and a step for a session that is not there
    with grpc.insecure_channel(cluster.route[1]) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.OpenSession(stage_pb2.OpenSessionRequest(max_length=8), timeout=10)
        replies = list(stub.Push(iter([stage_pb2.Step(session_id="nope", seq=1)]), timeout=10))
        assert [r.code for r in replies] == [grpc.StatusCode.NOT_FOUND.value[0]]
    errors = scrape(cluster.metrics[1])
    key = 'layerline_stage_rpcs_total{code="INVALID_ARGUMENT",method="OpenSession"}'
    assert errors[key] - after[1].get(key, 0) == 1
    assert (
        errors['layerline_stage_step_errors_total{code="NOT_FOUND"}']
        - after[1].get('layerline_stage_step_errors_total{code="NOT_FOUND"}', 0)
        == 1
    )


def test_reflection_and_health_as_grpcurl_uses_them(stages, tiny_checkpoint):
    cluster, _ = stages
    with grpc.insecure_channel(cluster.route[0]) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"layerline.v1.Stage", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        stage = DescriptorPool(db).FindServiceByName("layerline.v1.Stage")
        assert {"OpenSession", "Push", "Subscribe", "Drain"} <= {m.name for m in stage.methods}
        assert stage.methods_by_name["Push"].input_type.full_name == "layerline.v1.Step"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="layerline.v1.Stage"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    folder, _ = tiny_checkpoint(SPEC)
    with LocalCoordinator(folder, settle=0, extra_args=["--metrics-port", "0"]) as coordinator:
        with grpc.insecure_channel(coordinator.address) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            assert "layerline.v1.Coordinator" in set(db.get_services())
            methods = {m.name for m in DescriptorPool(db).FindServiceByName("layerline.v1.Coordinator").methods}
            assert {"Register", "Heartbeat", "Leave", "GetRoute", "Status"} <= methods
        m = scrape(coordinator.metrics)
        assert m["layerline_coordinator_stages"] == 0 and m["layerline_coordinator_plan_version_total"] == 0


def test_coordinator_metrics_follow_the_cluster(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint(SPEC)
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    with LocalCoordinator(
        folder, heartbeat=0.5, settle=30, expect=2, objective="throughput", extra_args=["--metrics-port", "0"]
    ) as c:
        with LocalCluster(folder, [None, None], coordinator=c.address, threads=1, env=env):
            deadline = time.monotonic() + 90
            while scrape(c.metrics).get("layerline_coordinator_ready_stages") != 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            with Client(coordinator=c.address) as client:
                client.generate(PROMPT, max_new_tokens=2, stop_token_ids=[], stream=False)
            m = scrape(c.metrics)
            assert m["layerline_coordinator_stages"] == 2 and m["layerline_coordinator_plan_version_total"] >= 1
            assert m["layerline_coordinator_predicted_bottleneck_seconds"] > 0
            assert m['layerline_coordinator_rpcs_total{code="OK",method="Register"}'] >= 2
            assert m['layerline_coordinator_rpcs_total{code="OK",method="GetRoute"}'] >= 1
            assert m['layerline_coordinator_rpcs_total{code="OK",method="Heartbeat"}'] >= 2


def test_json_logs_carry_the_session(stages):
    cluster, _ = stages
    with Client(cluster.route) as client, client.session(max_length=32) as s:
        s.generate(PROMPT, max_new_tokens=2, stop_token_ids=[], stream=False)
        ids = list(s.ids)
    time.sleep(0.3)
    for i, sid in enumerate(ids):
        records = [json.loads(line) for line in cluster.log_tail(i, 400).splitlines() if line.startswith("{")]
        assert records, cluster.log_tail(i)
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
        mine = [r for r in records if r.get("session") == sid[:8]]
        assert [r["message"].split(" ")[0] for r in mine] == ["opened", "session"], mine  # opened, then closed
        assert mine[0]["stage"] == ["layers 0:2", "layers 2:4"][i] and mine[0]["peer"].startswith("ipv4:127.0.0.1")
        assert sid not in json.dumps(records)  # never the whole id (a capability)
