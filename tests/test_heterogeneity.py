"""Unequal stages for real: one stage's CPU is cut to half a core with a cgroup v1 quota; it measures itself slower
and the coordinator gives it fewer layers than its peer, in inverse proportion to the measured time per layer. When the quota is lifted the stage measures itself
again (faster), registers anew, and the plan gives it more layers. (Needs root and the cgroup v1 cpu controller,
as on this project's machines; elsewhere the test says so and is skipped.)"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time

import grpc
import pytest

from layerline import cpu_quota
from layerline.client import Client
from layerline.cpu_quota import CpuQuota
from layerline.local_cluster import PARENT_ENV, READY_PREFIX, LocalCluster, LocalCoordinator
from layerline.v1 import coordinator_pb2 as pb
from layerline.v1 import coordinator_pb2_grpc
from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=12, hidden=256, heads=4, kv_heads=2, intermediate=1024)
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]


pytestmark = pytest.mark.skipif(not cpu_quota.available(), reason="needs a writable cgroup v1 cpu controller (root)")


def start_in_cgroup(argv: list[str], quota: CpuQuota, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A stage process that joins the cgroup before it execs (so it measures itself under the quota)."""
    wrapped = [*quota.prefix(), *argv]
    p = subprocess.Popen(
        wrapped,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, **env, **{PARENT_ENV: str(os.getpid())}),
    )
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        for line in p.stdout:
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert p.poll() is None, "the stage in the cgroup exited"
            continue
        if line.startswith(READY_PREFIX):
            return p, line
    raise AssertionError("the stage in the cgroup did not start")


def stages_by_address(address: str) -> dict[str, pb.StageStatus]:
    with grpc.insecure_channel(address) as channel:
        status = coordinator_pb2_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)
    return {s.report.address: s for s in status.stages}


def layers_by_address(address: str) -> dict[str, int]:
    return {a: s.assignment.end_layer - s.assignment.start_layer for a, s in stages_by_address(address).items()}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} within {timeout} s (last: {value})")


def test_half_the_cpu_gets_about_half_the_layers_and_the_plan_follows_changes(tiny_checkpoint, tmp_path):
    folder, ref = tiny_checkpoint(SPEC)
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    quota = CpuQuota(0.5, tag="layerline-test")
    slow = None
    try:
        with LocalCoordinator(
            folder, heartbeat=0.5, settle=120, expect=2, objective="throughput", env=env
        ) as coordinator:
            address = coordinator.address
            with LocalCluster(folder, [None], coordinator=address, threads=1, env=env) as fast:
                argv = LocalCluster(folder, [None], coordinator=address, threads=1).command(None)

                def split() -> tuple[int, int] | None:
                    layers = layers_by_address(address)
                    if len(layers) != 2 or sum(layers.values()) != SPEC.layers:
                        return None
                    fast_layers = layers.pop(fast.route[0])
                    return fast_layers, next(iter(layers.values()))

                # the quota shows in what the stage measured (on this project's VMs half a core costs 2.2-3.5x, not
                # 2x: a throttled vCPU comes back to cold caches). A measurement is a few seconds of timing on a
                # machine other work shares, so a stage that measured itself no slower than the other (the other
                # was slowed meanwhile) is started again to measure anew, twice at most.
                for attempt in range(3):
                    slow, _ = start_in_cgroup(argv + (["--remeasure"] if attempt else []), quota, env)
                    fast_layers, slow_layers = wait_for(split, 120, "a plan over both stages")
                    reports = {a: s.report for a, s in stages_by_address(address).items()}
                    fast_report = reports.pop(fast.route[0])
                    slow_report = next(iter(reports.values()))
                    slowdown = slow_report.decode_s_per_layer / fast_report.decode_s_per_layer
                    if slowdown >= 1.5 or attempt == 2:
                        break
                    slow.terminate()
                    slow.wait(timeout=15)
                    wait_for(lambda: len(layers_by_address(address)) == 1, 60, "the restarted stage dropped")
                what = f"split (fast, slow) {(fast_layers, slow_layers)}, measured slowdown {slowdown:.2f}x"
                # and the plan follows the measurement: the layers split in inverse proportion to the measured time
                # per layer, give or take the rounding and the last stage's LM head
                assert slowdown >= 1.5, what
                assert slow_layers < fast_layers, what
                assert abs(slow_layers - SPEC.layers / (1 + slowdown)) <= 1.5, what
                with Client(coordinator=address) as client:
                    wait_for(lambda: _route_ok(client), 60, "a route")
                    out = client.generate(PROMPT, max_new_tokens=8, stop_token_ids=[], stream=False)
                    assert out.token_ids == hf_greedy(ref, PROMPT, 8)
                # the quota is lifted: the stage measures itself again, faster, and gets more layers. (Not "an even
                # split": this machine's speed drifts over minutes, and the two stages were measured minutes apart.)
                slow_address = next(a for a in layers_by_address(address) if a != fast.route[0])
                per_layer_before = stages_by_address(address)[slow_address].report.decode_s_per_layer
                quota.set(None)
                seen: list = []

                def followed() -> tuple[int, int] | None:
                    # the stage heartbeats while it measures itself again: it is never dropped as dead
                    assert len(layers_by_address(address)) == 2, "a stage was dropped while it measured itself"
                    per_layer = stages_by_address(address)[slow_address].report.decode_s_per_layer
                    seen.append((s := split(), round(per_layer / per_layer_before, 2)))
                    faster = per_layer <= 0.9 * per_layer_before
                    return s if s and faster and s[1] > slow_layers else None

                try:
                    wait_for(followed, 90, "a plan giving the stage more layers after the quota was lifted")
                except AssertionError as e:
                    raise AssertionError(
                        f"{e}; (split (fast, slow), slow ms/layer now / before) seen: {sorted(set(seen), key=str)}"
                    ) from None
    finally:
        if slow is not None:
            slow.terminate()
            try:
                slow.wait(timeout=15)
            except subprocess.TimeoutExpired:
                slow.kill()
                slow.wait()
        quota.remove()


def _route_ok(client: Client) -> bool:
    try:
        client.connect()
        return True
    except Exception:
        return False
