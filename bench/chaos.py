"""Generations under stage failures, repeated: a coordinator and N stage servers (subprocesses on 127.0.0.1); each
trial streams one generation and, at a random token, kills (SIGKILL) a random stage of the session's chain. The
client finds the dead stage, gets a new chain from the coordinator (a replica, or a re-plan once the heartbeats
stop and the survivors have loaded the layers), replays the conversation and goes on. A new stage then replaces the
dead one before the next trial. Trials alternate greedy and seeded sampling; each is compared with a run of the same
kind without a fault, made at the start.

Prints trials, generations completed, token-identical to the no-fault run, and the pause the caller saw (the
longest gap between two tokens of a trial), with the no-fault runs' longest gap for scale.

    .venv/bin/python bench/chaos.py [--model smollm2] [--stages 3] [--trials 20] [--tokens 48] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time

import benchlib  # bench/benchlib.py, next to this script
import grpc

from layerline.client import AsyncClient, ClientConfig, RPCError
from layerline.local_cluster import LocalCluster, LocalCoordinator
from layerline.model_source import resolve_model
from layerline.v1 import coordinator_pb2 as pb
from layerline.v1 import coordinator_pb2_grpc

SECTION = "## Chaos: stages killed mid-generation"
PROMPT = "The history of the river begins"
SAMPLED = {"temperature": 0.8, "top_k": 40, "seed": 7}


def status(address: str) -> pb.ClusterStatus:
    with grpc.insecure_channel(address) as channel:
        return coordinator_pb2_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)


def wait_ready(address: str, stages: int, timeout: float = 300.0) -> None:
    """Until all `stages` stages are registered, ready and serving what the plan assigns them, and the route
    covers the model."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(address)
        settled = [
            s
            for s in st.stages
            if s.ready and (s.serving_start, s.serving_end) == (s.assignment.start_layer, s.assignment.end_layer)
        ]
        if len(st.stages) == stages and len(settled) == stages and st.route.addresses:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster did not settle within {timeout:g} s: {st}")
        time.sleep(0.25)


async def one_run(client: AsyncClient, tokens: int, options: dict, kill=None, at: int = 0):
    """(token ids, longest gap between tokens in seconds, failovers, error or None)."""
    got, times = [], [time.monotonic()]
    try:
        async with client.session(max_length=512) as s:
            async for piece in s.generate(PROMPT, max_new_tokens=tokens, stop_token_ids=[], **options):
                got.append(piece.token_id)
                times.append(time.monotonic())
                if kill is not None and len(got) == at:
                    kill([link.address for link in s.links])
            moves = s.failovers
    except RPCError as e:
        return got, 0.0, 0, e
    return got, max((b - a for a, b in zip(times[1:], times[2:], strict=False)), default=0.0), moves, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0, help="chooses the kill moments and victims")
    ap.add_argument("--out", default="", help="write the results into this markdown file's section")
    args = ap.parse_args()
    path = resolve_model(args.model)
    rng = random.Random(args.seed)
    cache = tempfile.TemporaryDirectory(prefix="layerline-chaos-")
    env = {"XDG_CACHE_HOME": cache.name}  # the stages' capacity measurements, shared by the replacements
    threads = max(1, (os.cpu_count() or 1) // args.stages)
    trials: list[dict] = []
    with LocalCoordinator(path, heartbeat=0.5, settle=0.5, expect=args.stages) as coordinator:
        address = coordinator.address
        clusters = []

        def add_stage() -> None:
            c = LocalCluster(
                path, [None], coordinator=address, dtype="float32", threads=threads, env=env, startup_timeout=300
            )
            c.start()
            clusters.append(c)

        try:
            for _ in range(args.stages):
                add_stage()
            wait_ready(address, args.stages)
            config = ClientConfig(step_timeout=30, failover_timeout=180)

            async def reference() -> dict:
                async with AsyncClient(coordinator=address, config=config) as client:
                    out = {}
                    for kind, options in (("greedy", {}), ("seeded", SAMPLED)):
                        got, gap, _, error = await one_run(client, args.tokens, options)
                        if error is not None:
                            raise error
                        out[kind] = (got, gap)
                    return out

            ref = asyncio.run(reference())
            print("no-fault runs:", {k: (len(v[0]), round(v[1], 3)) for k, v in ref.items()}, flush=True)
            for i in range(args.trials):
                kind = ("greedy", "seeded")[i % 2]
                at = rng.randint(1, args.tokens - 2)
                killed: list[str] = []

                def kill(chain: list[str], killed: list[str] = killed) -> None:
                    victim = rng.choice(chain)
                    for c in clusters:
                        if c.route and c.route[0] == victim and c.processes and c.processes[0].poll() is None:
                            c.processes[0].kill()
                            killed.append(victim)
                            return

                async def trial(kill=kill, kind=kind, at=at) -> tuple:
                    async with AsyncClient(coordinator=address, config=config) as client:
                        return await one_run(client, args.tokens, SAMPLED if kind == "seeded" else {}, kill, at)

                began = time.monotonic()
                got, gap, moves, error = asyncio.run(trial())
                row = {
                    "kind": kind,
                    "at": at,
                    "killed": killed[0] if killed else "",
                    "completed": error is None and len(got) == args.tokens,
                    "identical": error is None and got == ref[kind][0],
                    "pause": gap,
                    "moves": moves,
                    "seconds": time.monotonic() - began,
                    "error": str(error) if error else "",
                }
                trials.append(row)
                print(f"trial {i + 1}:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})
                # the dead stage's process is gone: a new stage takes its place before the next trial
                for c in [c for c in clusters if c.processes and c.processes[0].poll() is not None]:
                    c.stop()
                    clusters.remove(c)
                while len(clusters) < args.stages:
                    add_stage()
                wait_ready(address, args.stages)
        finally:
            for c in clusters:
                c.stop()
            cache.cleanup()

    done = [t for t in trials if t["completed"]]
    same = [t for t in trials if t["identical"]]
    pauses = [t["pause"] for t in done]
    lines = [
        f"{os.path.basename(path)}, float32, a coordinator and {args.stages} stage servers on 127.0.0.1 "
        f"({threads} torch thread(s) each); {args.trials} trials of {args.tokens} new tokens, alternately greedy and "
        f"seeded sampling ({SAMPLED}); in each, a random stage of the session's chain is killed (SIGKILL) at a "
        f"random token, and a new stage replaces it after the trial. Machine: {benchlib.machine()}.",
        "",
        "| trials | completed | token-identical to the no-fault run | pause at failover: median | mean | max |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {len(trials)} | {len(done)} ({100 * len(done) / max(1, len(trials)):.0f}%) | {len(same)} "
        f"({100 * len(same) / max(1, len(trials)):.0f}%) | "
        + (
            f"{statistics.median(pauses):.2f} s | {statistics.mean(pauses):.2f} s | {max(pauses):.2f} s |"
            if pauses
            else "- | - | - |"
        ),
        "",
        "The pause is the longest gap between two tokens the caller saw in a trial; without a fault the longest gap "
        f"was {max(v[1] for v in ref.values()):.2f} s. It holds the time to notice (a broken stream here: the "
        "process is gone), to locate the dead stage (Info probes), to get a chain (the coordinator re-plans once "
        "the heartbeats stop and the survivors have loaded the dead stage's layers, unless a replica serves them) "
        "and to replay the conversation.",
        "",
        "Target (faults issue): 100% completed and identical.",
    ]
    failed = [t for t in trials if not t["identical"]]
    if failed:
        lines += ["", "Trials that were not identical:", ""]
        lines += [f"- {t['kind']}, kill at token {t['at']}: {t['error'] or 'different tokens'}" for t in failed]
    benchlib.publish(lines, args.out, SECTION)
    sys.exit(0 if len(same) == len(trials) else 1)


if __name__ == "__main__":
    main()
