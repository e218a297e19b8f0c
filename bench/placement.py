"""Placement by measured capacity vs the usual rules, measured side by side in one run: 2 stages of unequal strength
on SmolLM2 (one stage held to half a core by a cgroup v1 CPU quota), each split served by real stage servers:

- the coordinator's plan from the stages' own measurements (they measure themselves alone, register, and the
  coordinator places them),
- the coordinator's plan refined under load: sessions decode through the coordinator's route for a while, the stages
  heartbeat their decode step times, and the coordinator re-plans from what it observed (`layerline coordinator
  --refine`; a CPU quota slows a stage less when it idles part of the time, and the stages share this machine's two
  cores with each other and the client, so the figures taken alone are not what serving sees),
- an even split,
- a memory-proportional split (exo's rule: layers in proportion to each stage's memory; here the slow stage is given
  twice the memory of the fast one, as a big-RAM CPU box next to a small fast card).

For each split: decode throughput with several sessions at once (the pipeline full), prefill throughput (concurrent
prompts), and, for the coordinator's plans, each stage's predicted time per decode step next to the time its compute
thread measured with the pipeline full. Needs root (cgroup v1 cpu controller).

    .venv/bin/python bench/placement.py [--sessions 4] [--tokens 32] [--prompt 128] [--repeats 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import benchlib  # bench/benchlib.py, next to this script
import grpc
import torch

from layerline import cpu_quota
from layerline.checkpoint import load_config
from layerline.client import AsyncClient
from layerline.cpu_quota import CpuQuota
from layerline.local_cluster import LocalCluster, LocalCoordinator
from layerline.model_source import resolve_model
from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc

SECTION = "## Placement by measured capacity"
# one step at a time, as capacity is measured and placement predicts (bench/sessions.py measures batching)
UNBATCHED = ["--max-batch", "1"]
REFINE_S = 5.0  # the coordinator re-plans from observed step times at most this often, here
PLAN, REFINED = "coordinator's plan, from the stages' measurements", "coordinator's plan, refined under load"
GiB = 1 << 30


def coordinator_status(address: str) -> coordinator_pb2.ClusterStatus:
    with grpc.insecure_channel(address) as channel:
        return coordinator_pb2_grpc.CoordinatorStub(channel).Status(coordinator_pb2.StatusRequest(), timeout=10)


def coordinator_plans(
    model: str, quota: CpuQuota, memories: list[int], env: dict[str, str], prompts: list[list[int]], load_s: float
) -> dict[str, tuple]:
    """Let a coordinator place the two stages, then refine the plan under load. For both the plan from the stages'
    own measurements and the refined one: (layer ranges, fast stage first; predicted seconds per decode step;
    per-layer decode seconds the coordinator plans with)."""
    with LocalCoordinator(
        model, heartbeat=0.5, settle=300, expect=2, env=env, extra_args=["--refine", str(REFINE_S)]
    ) as coordinator:
        stages = [
            LocalCluster(
                model,
                [None],
                coordinator=coordinator.address,
                dtype="float32",
                threads=1,
                env=env,
                extra_args=["--max-memory", str(memory), *UNBATCHED],
                prefixes=[quota.prefix() if slow else None],
            )
            for slow, memory in zip((False, True), memories, strict=True)
        ]

        def loaded_plan(timeout: float = 300) -> tuple[coordinator_pb2.ClusterStatus, list]:
            deadline = time.monotonic() + timeout
            while True:
                status = coordinator_status(coordinator.address)
                by_address = {st.report.address: st for st in status.stages}
                chosen = [by_address.get(s.route[0]) for s in stages]
                if all(
                    c is not None
                    and c.assignment.end_layer > c.assignment.start_layer
                    and (c.serving_start, c.serving_end) == (c.assignment.start_layer, c.assignment.end_layer)
                    and c.ready
                    for c in chosen
                ):
                    return status, chosen
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the coordinator made no plan over both stages: {status}")
                time.sleep(0.2)

        def summary(chosen: list) -> tuple:
            ranges = [(c.assignment.start_layer, c.assignment.end_layer) for c in chosen]
            return (
                ranges,
                [c.predicted_decode_s for c in chosen],
                [c.report.decode_s_per_layer * (c.load_factor or 1.0) for c in chosen],
            )

        try:
            for s in stages:
                s.start()
            status, chosen = loaded_plan()
            plans = {"measured": summary(chosen)}
            # load: sessions decode through the coordinator's route until the plan has stayed put for a while
            began, version, since = time.monotonic(), status.plan_version, time.monotonic()
            while time.monotonic() - began < load_s:
                asyncio.run(coordinator_load(coordinator.address, prompts, 32))
                status, chosen = loaded_plan()
                observed = all(abs(c.load_factor - 1.0) > 1e-9 for c in chosen)
                if status.plan_version != version:
                    version, since = status.plan_version, time.monotonic()
                elif observed and time.monotonic() - since > 2 * REFINE_S:
                    break
            plans["refined"] = summary(chosen)
            return plans
        finally:
            for s in stages:
                s.stop()


async def coordinator_load(address: str, prompts: list[list[int]], tokens: int) -> None:
    async with AsyncClient(coordinator=address) as client:
        await asyncio.gather(
            *(client.generate(p, max_new_tokens=tokens, stop_token_ids=[], stream=False) for p in prompts)
        )


def ordered(counts: tuple[int, int], fast_first: bool) -> list[tuple[int, int]]:
    """Contiguous ranges for (fast, slow) layer counts, in pipeline order."""
    first, second = counts if fast_first else counts[::-1]
    return [(0, first), (first, first + second)]


async def prefill_throughput(route: list[str], prompts: list[list[int]]) -> float:
    async with AsyncClient(route) as client:
        began = time.perf_counter()
        await asyncio.gather(*(client.generate(p, max_new_tokens=1, stop_token_ids=[], stream=False) for p in prompts))
        elapsed = time.perf_counter() - began
    return sum(len(p) for p in prompts) / elapsed


def compute_time(address: str) -> tuple[float, int]:
    with grpc.insecure_channel(address) as channel:
        info = stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)
    return info.compute_seconds, info.steps_computed


def per_stage_decode(route: list[str], prompts: list[list[int]], tokens: int) -> list[float]:
    """Each stage's compute seconds per decode step with all the sessions running at once (the pipeline full, as
    the prediction assumes), from its own counters: (run of `tokens` - run of 1 token) / the steps between."""
    runs = []
    for n in (1, tokens):
        before = [compute_time(a) for a in route]
        asyncio.run(benchlib.decode_throughput(route, prompts, n))
        after = [compute_time(a) for a in route]
        runs.append([(s1 - s0, n1 - n0) for (s0, n0), (s1, n1) in zip(before, after, strict=True)])
    return [(sn - s1) / (nn - n1) for (s1, n1), (sn, nn) in zip(runs[0], runs[1], strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--slow-cores", type=float, default=0.5, help="CPU quota of the slow stage, in cores")
    ap.add_argument("--sessions", type=int, default=4, help="concurrent sessions for the throughput figures")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per session")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per session (prefill figure)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--load-seconds", type=float, default=90.0, help="at most this long refining under load")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not cpu_quota.available():
        sys.exit("bench/placement.py needs root and the cgroup v1 cpu controller to make one stage slower")
    path = resolve_model(args.model)
    config = load_config(path)
    L = config.num_layers
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, config.vocab_size, (16,), generator=g).tolist() for _ in range(args.sessions)]
    long_prompts = [torch.randint(100, config.vocab_size, (args.prompt,), generator=g).tolist() for _ in prompts]
    memories = [1 * GiB, 2 * GiB]  # fast stage, slow stage
    quota = CpuQuota(args.slow_cores, tag="layerline-bench")
    try:
        with tempfile.TemporaryDirectory(prefix="layerline-bench-") as cache:
            env = {"XDG_CACHE_HOME": cache}  # measured afresh in this run
            plans = coordinator_plans(path, quota, memories, env, prompts, args.load_seconds)
        fast_first = plans["measured"][0][0][0] == 0
        even = (L // 2, L - L // 2)
        by_memory = (round(L * memories[0] / sum(memories)), L - round(L * memories[0] / sum(memories)))
        splits = {
            PLAN: tuple(b - a for a, b in plans["measured"][0]),
            REFINED: tuple(b - a for a, b in plans["refined"][0]),
            "even split": even,
            "memory-proportional (exo)": by_memory,
        }
        orders = {PLAN: plans["measured"][0][0][0] == 0, REFINED: plans["refined"][0][0][0] == 0}
        results = {}
        for name, counts in splits.items():
            first_fast = orders.get(name, fast_first)
            ranges = ordered(counts, first_fast)
            prefixes = [None, quota.prefix()] if first_fast else [quota.prefix(), None]
            with LocalCluster(
                path, ranges, dtype="float32", threads=1, prefixes=prefixes, extra_args=UNBATCHED
            ) as cluster:
                route = cluster.route
                asyncio.run(benchlib.decode_throughput(route, prompts[:1], 4))  # warm-up
                dec = [
                    asyncio.run(benchlib.decode_throughput(route, prompts, args.tokens)) for _ in range(args.repeats)
                ]
                pre = [asyncio.run(prefill_throughput(route, long_prompts)) for _ in range(args.repeats)]
                stage_times = per_stage_decode(route, prompts, args.tokens) if name in orders else []
                if stage_times and not first_fast:
                    stage_times = stage_times[::-1]  # fast stage first, as the plans list them
            results[name] = (counts, statistics.median(dec), statistics.median(pre), stage_times)
    finally:
        quota.remove()

    base_dec, base_pre = results["even split"][1], results["even split"][2]
    measured_caps, refined_caps = plans["measured"][2], plans["refined"][2]
    lines = [
        f"Placement: {os.path.basename(path)}, float32, 2 stage servers on 127.0.0.1, 1 torch thread each; the slow "
        f"stage is held to {args.slow_cores:g} core by a cgroup v1 CPU quota. Memory given to the stages (fast, slow): "
        f"{memories[0] / GiB:g} GiB, {memories[1] / GiB:g} GiB. Decode: {args.sessions} concurrent sessions x "
        f"{args.tokens} tokens; prefill: {args.sessions} concurrent {args.prompt}-token prompts; medians of "
        f"{args.repeats}. The coordinator's first plan comes from the stages' own measurements in this run (decode "
        f"{1e3 * measured_caps[0]:.2f} and {1e3 * measured_caps[1]:.2f} ms/layer, fast and slow); the refined plan from "
        f"what it observed under load through its route afterwards ({1e3 * refined_caps[0]:.2f} and "
        f"{1e3 * refined_caps[1]:.2f} ms/layer; `--refine {REFINE_S:g}`).",
        f"Machine: {benchlib.machine()}.",
        "",
        "| split (fast stage, slow stage layers) | decode tok/s | vs even | prefill tok/s | vs even |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (counts, dec, pre, _) in results.items():
        lines.append(
            f"| {name} ({counts[0]}, {counts[1]}) | {dec:.1f} | {dec / base_dec:.2f}x | {pre:.0f} | "
            f"{pre / base_pre:.2f}x |"
        )
    lines += [
        "",
        "Target: the coordinator's plan >= 1.3x the even split when one stage has half the CPU.",
        "",
        "Predicted vs measured time per decode step on each stage of the coordinator's plans (measured = the stage's "
        f"compute-thread seconds per decode step from its own counters, {args.sessions} sessions at once):",
        "",
        "| plan | stage | layers | predicted ms | measured ms | measured / predicted |",
        "|---|---|---:|---:|---:|---:|",
    ]
    names = ["fast", "slow"]
    for name, key in ((PLAN, "measured"), (REFINED, "refined")):
        counts, _, _, measured = results[name]
        for i, (pred, meas) in enumerate(zip(plans[key][1], measured, strict=True)):
            lines.append(
                f"| {name} | {names[i]} | {counts[i]} | {1e3 * pred:.2f} | {1e3 * meas:.2f} | {meas / pred:.2f} |"
            )
    lines += ["", "Target: predicted within 15% of measured."]
    benchlib.publish(lines, args.out, SECTION)


if __name__ == "__main__":
    main()
