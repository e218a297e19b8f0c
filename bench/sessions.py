"""Many sessions at once, measured side by side in one run: aggregate decode tokens/s of N concurrent sessions vs
one session, on 2 stage servers (SmolLM2, one torch thread each), with the stages batching the decode steps of
different sessions into one forward pass (the default, `--max-batch 16`), the same with oneDNN-packed weights
(`--pack-weights`: a batched step of 4 rows costs ~2x one row instead of ~3x on this CPU), and without batching
(`--max-batch 1`). The layers are split as a coordinator places two equal stages: by the capacity measured here
(the last stage also runs the LM head, about 8 layers' worth of SmolLM2's compute, so it gets fewer layers).

    .venv/bin/python bench/sessions.py [--sessions 8] [--tokens 32] [--repeats 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from dataclasses import replace

import benchlib  # bench/benchlib.py, next to this script
import grpc

from layerline.local_cluster import LocalCluster
from layerline.model_source import resolve_model
from layerline.v1 import stage_pb2, stage_pb2_grpc

SECTION = "## Concurrent sessions"


def batched_share(route: list[str]) -> list[tuple[int, int]]:
    out = []
    for address in route:
        with grpc.insecure_channel(address) as channel:
            info = stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)
        out.append((info.batched_steps, info.steps_computed))
    return out


def decode_rate(times: dict[tuple[int, int], list[float]], k: int, tokens: int) -> float:
    """Decode tokens/s of k sessions at once: the tokens after each one's first over the time they added (prefill and
    session set-up, in both runs, cancel out)."""
    t_n, t_1 = statistics.median(times[(k, tokens)]), statistics.median(times[(k, 1)])
    return k * (tokens - 1) / (t_n - t_1)


def coordinator_split(config) -> list[tuple[int, int]]:
    """The ranges a coordinator gives two stages of this machine's measured capacity (one torch thread)."""
    import torch

    from layerline.coordinator.placement import place
    from layerline.coordinator.registry import model_shape
    from layerline.coordinator.service import capacity_from_report
    from layerline.stage_server.capacity import measure
    from layerline.v1 import coordinator_pb2

    torch.set_num_threads(1)
    c = measure(config)
    report = coordinator_pb2.StageReport(
        decode_s_per_layer=c.decode_s_per_layer,
        decode_s_fixed=c.decode_s_fixed,
        head_decode_s=c.head_decode_s,
        prefill_s_per_layer_token=c.prefill_s_per_layer_token,
        memory_bytes=16 << 30,
        bytes_per_param=8,  # packed weights: twice the float32 weights
    )
    caps = [replace(capacity_from_report(report), name=n) for n in ("first", "second")]
    plan = place(model_shape(config), caps)
    return [(a.start, a.end) for a in plan.assignments]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per session")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="", help="write the results into this markdown file's section")
    args = ap.parse_args()
    path = resolve_model(args.model)
    from layerline.checkpoint import load_config

    config = load_config(path)
    ranges = coordinator_split(config)
    prompts = [[1 + (7 * i + j) % 500 for j in range(8 + i)] for i in range(args.sessions)]
    results: dict[str, tuple[float, float, float]] = {}
    setups = (
        ("batched, packed weights (--max-batch 16 --pack-weights)", ["--max-batch", "16", "--pack-weights"]),
        ("batched (--max-batch 16)", ["--max-batch", "16"]),
        ("one step at a time (--max-batch 1)", ["--max-batch", "1"]),
    )
    for label, extra in setups:
        with LocalCluster(path, ranges, dtype="float32", threads=1, extra_args=extra) as cluster:
            route = cluster.route
            asyncio.run(benchlib.decode_throughput(route, prompts[:1], 4))  # warm-up
            times: dict[tuple[int, int], list[float]] = {}  # (sessions, tokens) -> seconds of each repeat
            before = batched_share(route)
            for _ in range(args.repeats):
                for group in (prompts[:1], prompts):
                    for n in (1, args.tokens):
                        rate = asyncio.run(benchlib.decode_throughput(route, group, n))
                        times.setdefault((len(group), n), []).append(len(group) * n / rate)
            after = batched_share(route)
            share = sum(b1 - b0 for (b1, _), (b0, _) in zip(after, before, strict=True)) / max(
                1, sum(n1 - n0 for (_, n1), (_, n0) in zip(after, before, strict=True))
            )

        results[label] = (decode_rate(times, 1, args.tokens), decode_rate(times, len(prompts), args.tokens), share)
        print(label, results[label], flush=True)

    lines = [
        f"Concurrent sessions: {os.path.basename(path)}, float32, 2 stage servers on 127.0.0.1 (layers "
        f"{ranges[0][0]}:{ranges[0][1]} and {ranges[1][0]}:{ranges[1][1]}, as a coordinator places two stages of the "
        f"capacity measured here), 1 torch thread each; {args.tokens} new tokens per session, greedy; medians of "
        f"{args.repeats}; one session and {args.sessions} at once take turns within each repeat. Decode tokens/s = "
        f"the tokens after each session's first over the time they add (a run of {args.tokens} tokens minus a run of "
        "1, so that prefill and session set-up are left out, as in the decode benchmark).",
        f"Machine: {benchlib.machine()}.",
        "",
        f"| stages | 1 session tok/s | {args.sessions} sessions tok/s (aggregate) | ratio | steps in shared passes |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, (one, many, share) in results.items():
        lines.append(f"| {label} | {one:.1f} | {many:.1f} | {many / one:.2f}x | {100 * share:.0f}% |")
    lines += ["", f"Target (micro-batch issue): {args.sessions} sessions >= 4x one session."]
    benchlib.publish(lines, args.out, SECTION)


if __name__ == "__main__":
    main()
