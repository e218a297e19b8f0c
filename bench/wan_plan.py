"""The coordinator's prediction against what a client then gets, across test hosts with unequal links: SmolLM2 on
three stages placed by a coordinator (each stage's memory holds less than half the model, so the plan needs all
three), each stage on a test host of its own (tests/netbed.py), the coordinator and the client on a fourth; every
link 10 ms one way and 100 Mbit/s except one host's, 5x slower (50 ms, 20 Mbit/s). The stages measure their links
(Stage.Probe) and the coordinator plans with them (the default objective: one session's speed).

Printed side by side, from one run: the plan's predicted decode tokens/s (one session, server loop) and prefill
tokens/s (a 1,024-token prompt), what the client measured (decode: (n - 1) / (time for n tokens - time for 1);
prefill: 1,024 / the time to the first token of a fresh 1,024-token prompt, which also pays the client's own two
hops and the session's opening), and what the chain's first stage measured (coordinator Status: server-loop rounds,
and a last 1,024-token prompt from its first chunk to its first token back). Medians of interleaved repeats.

    .venv/bin/python bench/wan_plan.py [--repeats 3] [--rounds 2] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import benchlib  # bench/benchlib.py, next to this script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from netbed import Link, NetBed, _readline  # noqa: E402  (tests/netbed.py: the test hosts)

from layerline.local_cluster import COORDINATOR_READY  # noqa: E402
from layerline.model_source import resolve_model  # noqa: E402

SECTION = "## Plan against measurement across unequal links"
COORDINATOR_PORT = 7500
PREFILL = 1024


def worker(args: argparse.Namespace) -> None:
    """On the client's host: wait for a settled plan, then measure; prints one JSON line."""
    import grpc

    from layerline.client import Client, ClientConfig
    from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc

    job = json.loads(args.worker)

    def status() -> coordinator_pb2.ClusterStatus:
        with grpc.insecure_channel(job["coordinator"]) as ch:
            return coordinator_pb2_grpc.CoordinatorStub(ch).Status(coordinator_pb2.StatusRequest(), timeout=30)

    # settled: every stage reports its links, the route is whole, and the plan has not changed for a while
    deadline, seen, since = time.monotonic() + 600, None, time.monotonic()
    while True:
        st = status()
        key = (st.plan_version, tuple(st.route.addresses))
        if key != seen:
            seen, since = key, time.monotonic()
        links = all(len(s.links) == len(st.stages) - 1 for s in st.stages)
        if links and st.route.addresses and time.monotonic() - since > job["settle"]:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"no settled plan: {st}")
        time.sleep(1.0)
    cfg = ClientConfig(reuse_prefixes=False)
    out: dict = {}
    with Client(coordinator=job["coordinator"], config=cfg) as c:
        messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
        c.chat(messages, max_new_tokens=2, stream=False)  # warm-up
        ones, ns, n = [], [], 0
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            c.chat(messages, max_new_tokens=1, stream=False)
            ones.append(time.perf_counter() - t)
            t = time.perf_counter()
            g = c.chat(messages, max_new_tokens=job["tokens"], stream=False)
            ns.append(time.perf_counter() - t)
            n = len(g.token_ids)
        out["decode"] = (n - 1) / max(1e-9, statistics.median(ns) - statistics.median(ones))
        prompt = list(range(1000, 1000 + PREFILL))
        times = []
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            c.generate(prompt, max_new_tokens=1, stop_token_ids=[], stream=False)
            times.append(time.perf_counter() - t)
        out["prefill"] = PREFILL / statistics.median(times)
        # a prompt the first stage sees to its end: one that goes on to a second token (the server loop's first
        # step back closes it); the rest of its last window holds nothing else
        c.generate(prompt, max_new_tokens=2, stop_token_ids=[], stream=False)
    time.sleep(job["heartbeat"] * 3)  # the first stage's counters reach the coordinator
    st = status()
    f = st.figures[0]
    out["predicted_decode"], out["predicted_prefill"] = f.decode_tokens_per_s, f.prefill_tokens_per_s
    out["measured_decode"], out["measured_prefill"] = st.measured_decode_tokens_per_s, st.measured_prefill_tokens_per_s
    out["chain"] = [f"{a} {f.boundaries[i]}:{f.boundaries[i + 1]}" for i, a in enumerate(f.addresses)]
    out["rejected"] = [
        (r.label, r.decode_tokens_per_s, r.prefill_tokens_per_s, r.note, len(r.addresses)) for r in st.figures[1:]
    ]
    out["links"] = {f"{s.report.address} -> {x.address}": (x.rtt_s, x.bytes_per_s) for s in st.stages for x in s.links}
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="embedded model name, HF folder or GGUF file")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of measurements (the plan stays)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    why = NetBed.unavailable()
    if why:
        raise SystemExit(f"no test hosts here: {why}")
    from layerline.checkpoint import open_checkpoint
    from layerline.coordinator.registry import model_shape

    model = resolve_model(args.model)
    ckpt = open_checkpoint(model)
    try:
        shape = model_shape(ckpt.config, ckpt.stored_types())
    finally:
        ckpt.close()
    q = shape.quantized["stored"]
    total = sum(q.layers) + q.embed + q.head
    kv = 96 << 20  # room for a few thousand positions of a dozen layers
    memory = math.ceil(0.45 * total) + kv  # what the KV budget leaves holds 45% of the model's weights
    normal, slow = Link(delay=0.01, rate_mbit=100), Link(delay=0.05, rate_mbit=20)
    heartbeat = 1.0
    with NetBed([normal, normal, normal, slow]) as bed:
        coordinator = f"{bed.hosts[0].ip}:{COORDINATOR_PORT}"
        p = bed.popen(
            0,
            [sys.executable, "-m", "layerline.cli", "coordinator", "--model", model, "--host", bed.hosts[0].ip,
             "--port", str(COORDINATOR_PORT), "--expect", "3", "--settle", "300", "--heartbeat", str(heartbeat),
             "--refine", "5"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        if not _readline(p, 120, COORDINATOR_READY):
            raise SystemExit("the coordinator did not start")
        for host in (1, 2, 3):
            bed.stage(host, model, None, "--coordinator", coordinator, "--max-memory", str(memory),
                      "--kv-cache-bytes", str(kv))  # fmt: skip
        job = {"coordinator": coordinator, "tokens": args.tokens, "repeats": args.repeats, "settle": 15,
               "heartbeat": heartbeat}  # fmt: skip
        runs = []
        for _ in range(args.rounds):
            done = subprocess.run(
                [*bed.command(0, []), sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"the client failed:\n{done.stderr[-4000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    benchlib.publish(report(runs, args, bed), args.out, SECTION)


def report(runs: list[dict], args, bed: NetBed) -> list[str]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    last = runs[-1]
    slow_ip = bed.hosts[3].ip
    lines = [
        f"Machine: {benchlib.machine()}. SmolLM2-135M-Instruct (Q4_1 GGUF), 3 stages placed by a coordinator "
        f"(each stage's memory holds 45% of the weights), each on a test host of its own; the coordinator and the "
        f"client on a fourth. Links: 10 ms one way and 100 Mbit/s, except host {slow_ip}'s: 50 ms and 20 Mbit/s. "
        f"{args.rounds} rounds of {args.repeats} repeats; decode over up to {args.tokens} tokens.",
        "",
        f"Chain (plan in force): {' -> '.join(last['chain'])}.",
        "",
        "| figure | predicted | measured by the client | vs predicted | measured at the first stage | vs predicted |",
        "|---|---|---|---|---|---|",
    ]
    for name, key in (("decode tok/s (one session)", "decode"), (f"prefill tok/s ({PREFILL} tokens)", "prefill")):
        pred, client, first = med(f"predicted_{key}"), med(key), med(f"measured_{key}")
        lines.append(
            f"| {name} | {pred:.1f} | {client:.1f} | {client / pred:.2f}x | {first:.1f} | {first / pred:.2f}x |"
        )
    lines += ["", "Rejected alternatives (predicted):", ""]
    for label, dec, pre, note, n in last["rejected"]:
        lines.append(f"- {label}: " + (f"decode {dec:.1f} tok/s, prefill {pre:.0f} tok/s ({n} stages)" if n else note))
    lines += ["", "Links as the stages measured them (round trip, bandwidth):", ""]
    for name, (rtt, bw) in sorted(last["links"].items()):
        lines.append(f"- {name}: {1e3 * rtt:.1f} ms, {8 * bw / 1e6:.0f} Mbit/s")
    lines += [
        "",
        "Target: predicted within 20% of measured. The client's prefill also pays its own hops to the first stage and "
        "from the last one, and the opening of the session on every stage; the first stage's figure does not.",
    ]
    return lines


if __name__ == "__main__":
    main()
