"""Many sessions at once, measured side by side in one run: aggregate decode tokens/s of N concurrent sessions vs
one session, on 2 stage servers (SmolLM2, one torch thread each), with the stages batching the decode steps of
different sessions into one forward pass (the default, `--max-batch 16`) and without (`--max-batch 1`).

    .venv/bin/python bench/sessions.py [--sessions 8] [--tokens 32] [--repeats 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

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

    L = load_config(path).num_layers
    ranges = [(0, L // 2), (L // 2, L)]
    prompts = [[1 + (7 * i + j) % 500 for j in range(8 + i)] for i in range(args.sessions)]
    results: dict[str, tuple[float, float, float]] = {}
    for label, max_batch in (("batched (--max-batch 16)", 16), ("one step at a time (--max-batch 1)", 1)):
        with LocalCluster(path, ranges, threads=1, extra_args=["--max-batch", str(max_batch)]) as cluster:
            route = cluster.route
            asyncio.run(benchlib.decode_throughput(route, prompts[:1], 4))  # warm-up
            one, many = [], []
            before = batched_share(route)
            for _ in range(args.repeats):
                one.append(asyncio.run(benchlib.decode_throughput(route, prompts[:1], args.tokens)))
                many.append(asyncio.run(benchlib.decode_throughput(route, prompts, args.tokens)))
            after = batched_share(route)
            share = sum(b1 - b0 for (b1, _), (b0, _) in zip(after, before, strict=True)) / max(
                1, sum(n1 - n0 for (_, n1), (_, n0) in zip(after, before, strict=True))
            )
        results[label] = (statistics.median(one), statistics.median(many), share)
        print(label, results[label], flush=True)

    lines = [
        f"Concurrent sessions: {os.path.basename(path)}, float32, 2 stage servers on 127.0.0.1 (layers "
        f"{ranges[0][0]}:{ranges[0][1]} and {ranges[1][0]}:{ranges[1][1]}), 1 torch thread each; {args.tokens} new "
        f"tokens per session, greedy; medians of {args.repeats}.",
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
