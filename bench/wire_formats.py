"""What the hidden states' wire dtype does, measured side by side in one run: SmolLM2 in three stages (float32
compute) with float32, bfloat16 and int8 (a float32 scale per token) hidden states between the stages.

- Quality, on loopback: the perplexity of a fixed English text (the per-token log-probabilities of `score`, the
  same text for every wire), and greedy decoding of a chat answer: the number of tokens equal to float32's before
  the first difference.
- Prefill across test hosts (tests/netbed.py: each stage on a host of its own, the client on a fourth, every link
  10 ms one way and 100 Mbit/s): the time to the first token of a fresh 1,000-token prompt, medians of repeats.

    .venv/bin/python bench/wire_formats.py [--repeats 3] [--out docs/benchmarks.md]
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
from netbed import Link, NetBed  # noqa: E402  (tests/netbed.py: the test hosts)

from layerline.local_cluster import LocalCluster  # noqa: E402
from layerline.model_source import resolve_model  # noqa: E402

SECTION = "## Hidden states on the wire: float32, bfloat16, int8"
WIRES = ("float32", "bfloat16", "int8")
SPLIT = [(0, 10), (10, 20), (20, 30)]
TEXT = (
    "The lighthouse stood at the end of a long stone pier, and every evening the keeper climbed its hundred and "
    "twelve steps to light the lamp. Ships passing in the night saw the beam sweep across the water and knew where "
    "the rocks were. In winter the storms came from the north, and the waves broke over the pier so that the keeper "
    "had to wait for a lull before he could cross. He kept a log of every ship he saw, with the time and the "
    "weather, and after thirty years the log filled a whole shelf of the small room at the bottom of the tower."
)
QUESTION = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


def quality(route: list[str], wire: str, tokens: int) -> dict:
    from layerline.client import Client, ClientConfig

    with Client(route, config=ClientConfig(wire_dtype=wire)) as c:
        logprobs = c.score([TEXT])[0]
        ids = c.chat(QUESTION, max_new_tokens=tokens, stream=False).token_ids
    return {"ppl": math.exp(-sum(logprobs) / len(logprobs)), "ids": ids, "scored": len(logprobs)}


def worker(args: argparse.Namespace) -> None:
    """On the client's host: prefill times of one wire dtype, as one JSON line."""
    from layerline.client import Client, ClientConfig

    job = json.loads(args.worker)
    prompt = list(range(1000, 2000))
    with Client(job["route"], config=ClientConfig(wire_dtype=job["wire"], reuse_prefixes=False)) as c:
        c.generate(prompt[:8], max_new_tokens=1, stop_token_ids=[], stream=False)  # warm-up
        times = []
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            c.generate(prompt, max_new_tokens=1, stop_token_ids=[], stream=False)
            times.append(time.perf_counter() - t)
    print(json.dumps({"prefill_s": statistics.median(times)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=96, help="greedy tokens compared with float32's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    model = resolve_model(args.model)
    with LocalCluster(model, SPLIT, threads=1) as lo:
        q = {wire: quality(lo.route, wire, args.tokens) for wire in WIRES}
    prefill: dict[str, list[float]] = {}
    why = NetBed.unavailable()
    if not why:
        with NetBed([Link(delay=0.01, rate_mbit=100)] * 4) as bed:
            route = [bed.stage(i + 1, model, f"{a}:{b}") for i, (a, b) in enumerate(SPLIT)]
            for _ in range(2):  # interleaved rounds
                for wire in WIRES:
                    job = {"route": route, "wire": wire, "repeats": args.repeats}
                    done = subprocess.run(
                        [*bed.command(0, []), sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                        capture_output=True, text=True, timeout=900,
                    )  # fmt: skip
                    if done.returncode != 0:
                        raise SystemExit(f"the client failed:\n{done.stderr[-4000:]}")
                    prefill.setdefault(wire, []).append(json.loads(done.stdout.strip().splitlines()[-1])["prefill_s"])
    ref = q["float32"]["ids"]
    lines = [
        f"Machine: {benchlib.machine()}. SmolLM2-135M-Instruct (Q4_1 GGUF, its blocks as stored, float32 compute), 3 stages of 10 layers. "
        f"Perplexity of a {q['float32']['scored'] + 1}-token English text (`score`); greedy chat answer of up to "
        f"{args.tokens} tokens on loopback; prefill of a fresh 1,000-token prompt across test hosts (10 ms one way, "
        f"100 Mbit/s, client on its own host), medians of {args.repeats} x 2 interleaved repeats.",
        "",
        "| wire | bytes / token (576 hidden) | perplexity | vs float32 | greedy tokens equal to float32's | "
        "prefill 1,000 tokens, s | vs float32 |",
        "|---|---|---|---|---|---|---|",
    ]
    size = {"float32": 576 * 4, "bfloat16": 576 * 2, "int8": 576 + 4}
    for wire in WIRES:
        ids = q[wire]["ids"]
        same = next((i for i, (a, b) in enumerate(zip(ids, ref, strict=False)) if a != b), min(len(ids), len(ref)))
        equal = "all" if ids == ref else f"{same} of {len(ref)}"
        pre = statistics.median(prefill[wire]) if prefill else float("nan")
        pre0 = statistics.median(prefill["float32"]) if prefill else float("nan")
        lines.append(
            f"| {wire} | {size[wire]} | {q[wire]['ppl']:.4f} | {q[wire]['ppl'] / q['float32']['ppl']:.4f}x | {equal} "
            f"| {pre:.2f} | {pre / pre0:.2f}x |"
        )
    if why:
        lines += ["", f"No test hosts here ({why}): prefill across links not measured."]
    benchlib.publish(lines, args.out, SECTION)


if __name__ == "__main__":
    main()
