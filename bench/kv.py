"""KV memory on demand, measured side by side in one run on 2 stage servers of SmolLM2 (its GGUF file, blocks as
stored, one torch thread each), with the same KV budget on both sides: what 8 sessions of max_length 2048 take when
each reserves its whole max_length at open (the contiguous cache, `--kv-block-size 0`).

1. Sessions: how many sessions of max_length 2048 using ~200 positions each (a 150-token prompt, 50 new tokens)
   are admitted and served at once with the paged cache, each checked against the same prompt decoded alone in one
   process (contiguous cache); and their aggregate decode tokens/s against the 8 the contiguous cache admits.
2. Time to first token of a session whose 1,000-token system prompt the stages have cached (from an earlier
   session of the same client) against one whose system prompt is new; streaming, medians of interleaved repeats.
3. Decode tokens/s of one session, paged against contiguous (prefix reuse off on both).

Decode rate = tokens after each session's first over the time they add (a run of N tokens minus a run of 1, as in
the other decode benchmarks), so prefill and set-up cancel out; the prefix cache is off for these runs (otherwise
the N-token run would find the 1-token run's prompts cached).

    .venv/bin/python bench/kv.py [--sessions 64] [--repeats 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import benchlib  # bench/benchlib.py, next to this script
import grpc
import torch

from layerline.checkpoint import load_config
from layerline.client import AsyncClient, ClientConfig, RPCError
from layerline.local_cluster import LocalCluster
from layerline.model_source import resolve_model
from layerline.pipeline import LocalPipeline, split_layers
from layerline.v1 import stage_pb2, stage_pb2_grpc

SECTION = "## KV cache: paged and prefix-cached"
MAX_LENGTH = 2048
NO_PREFIXES = ClientConfig(reuse_prefixes=False)


def info(address: str) -> stage_pb2.StageInfo:
    with grpc.insecure_channel(address) as channel:
        return stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10)


def prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


async def run_sessions(route: list[str], group: list[list[int]], tokens: int, config: ClientConfig):
    """One session per prompt, all at once: (seconds, each one's tokens)."""
    async with AsyncClient(route, config=config) as client:

        async def one(p: list[int]) -> list[int]:
            async with client.session(max_length=MAX_LENGTH) as s:
                return (await s.generate(p, max_new_tokens=tokens, stop_token_ids=[], stream=False)).token_ids

        began = time.perf_counter()
        outs = await asyncio.gather(*(one(p) for p in group))
        return time.perf_counter() - began, outs


def decode_rate(route: list[str], group: list[list[int]], tokens: int, repeats: int) -> tuple[float, list]:
    """Aggregate decode tokens/s of len(group) sessions at once, and the tokens of the last full run."""
    full, one = [], []
    outs: list = []
    for _ in range(repeats):
        t1, _ = asyncio.run(run_sessions(route, group, 1, NO_PREFIXES))
        tn, outs = asyncio.run(run_sessions(route, group, tokens, NO_PREFIXES))
        one.append(t1)
        full.append(tn)
    return len(group) * (tokens - 1) / (statistics.median(full) - statistics.median(one)), outs


def admitted_contiguous(route: list[str]) -> int:
    """Sessions of max_length 2048 the contiguous cache lets open before RESOURCE_EXHAUSTED."""

    async def count() -> int:
        async with AsyncClient(route) as client:
            opened = []
            try:
                while len(opened) < 256:
                    s = client.session(max_length=MAX_LENGTH)
                    await s.open()
                    opened.append(s)
            except RPCError as e:
                if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
            for s in opened:
                await s.close()
            return len(opened)

    return asyncio.run(count())


async def first_token_seconds(client: AsyncClient, prompt: list[int]) -> float:
    async with client.session(max_length=MAX_LENGTH) as s:
        began = time.perf_counter()
        async for _ in s.generate(prompt, max_new_tokens=2, stop_token_ids=[]):
            return time.perf_counter() - began
    raise RuntimeError("no token")


async def first_tokens(route: list[str], system: list[int], repeats: int, vocab: int) -> tuple[list, list]:
    """Time to first token, one client (prefixes are shared within a client key): a new system prompt each
    time, and the same one, cached by a first session, each followed by a new question; interleaved."""
    cold, warm = [], []
    async with AsyncClient(route) as client:
        await first_token_seconds(client, system + prompts(1, 20, 3, vocab)[0])  # caches it
        for r in range(repeats):
            question = prompts(1, 20, 100 + r, vocab)[0]
            fresh = prompts(1, len(system), 200 + r, vocab)[0]
            cold.append(await first_token_seconds(client, fresh + question))
            warm.append(await first_token_seconds(client, system + question))
    return cold, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=150, help="prompt tokens per session")
    ap.add_argument("--tokens", type=int, default=50, help="new tokens per session")
    ap.add_argument("--system", type=int, default=1000, help="system prompt tokens (time to first token)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="", help="write the results into this markdown file's section")
    args = ap.parse_args()
    path = resolve_model(args.model)
    torch.set_num_threads(2)
    config = load_config(path)
    local = LocalPipeline.load(path, [(0, config.num_layers)])
    vocab = config.vocab_size
    ranges = split_layers(config.num_layers, 2)
    # K and V of one position in every layer of the larger stage, float32
    per_position = max(2 * (b - a) * config.num_kv_heads * config.head_dim * 4 for a, b in ranges)
    budget = 8 * MAX_LENGTH * per_position  # what 8 sessions reserve
    group = prompts(args.sessions, args.prompt, 1, vocab)
    print(f"budget {budget} bytes per stage; references for {len(group)} prompts in one process...", flush=True)
    alone = [list(local.generate(p, args.tokens, prefill_chunk=512)) for p in group]
    del local

    common = ["--kv-cache-bytes", str(budget), "--max-batch", "64"]
    with (
        LocalCluster(path, ranges, threads=1, extra_args=common) as paged,
        LocalCluster(path, ranges, threads=1, extra_args=[*common, "--kv-block-size", "0"]) as contiguous,
    ):
        reserved = admitted_contiguous(contiguous.route)
        print("contiguous admits", reserved, flush=True)
        # 1. many sessions
        rate_paged, outs = decode_rate(paged.route, group, args.tokens, args.repeats)
        exact = sum(o == a for o, a in zip(outs, alone, strict=True))
        peak = max(info(a).kv_blocks_used + info(a).kv_blocks_cached for a in paged.route)
        rate_contiguous, outs8 = decode_rate(contiguous.route, group[:reserved], args.tokens, args.repeats)
        exact8 = sum(o == a for o, a in zip(outs8, alone[:reserved], strict=True))
        print("sessions", rate_paged, exact, rate_contiguous, exact8, flush=True)
        # 2. time to first token, cached system prompt vs new; interleaved
        system = prompts(1, args.system, 2, vocab)[0]
        cold, warm = asyncio.run(first_tokens(paged.route, system, args.repeats + 2, vocab))
        ttft_cold, ttft_warm = statistics.median(cold), statistics.median(warm)
        print("ttft", ttft_cold, ttft_warm, flush=True)
        # 3. one session, paged vs contiguous, interleaved
        one = prompts(1, 100, 4, vocab)
        singles: dict[str, list[float]] = {"paged": [], "contiguous": []}
        for _ in range(3 * args.repeats):
            for name, cluster in (("paged", paged), ("contiguous", contiguous)):
                singles[name].append(decode_rate(cluster.route, one, 64, 1)[0])
        single_paged, single_contiguous = (statistics.median(singles[k]) for k in ("paged", "contiguous"))
        print("single", singles, flush=True)

    lines = [
        f"KV cache: {os.path.basename(path)} (blocks as stored), 2 stage servers on 127.0.0.1 (layers "
        f"{ranges[0][0]}:{ranges[0][1]} and {ranges[1][0]}:{ranges[1][1]}), 1 torch thread each, "
        f"--max-batch 64; the same KV budget on both sides, {budget / (1 << 20):.0f} MiB per stage: what 8 sessions "
        f"of max_length {MAX_LENGTH} reserve. Greedy; medians of {args.repeats} repeats ({3 * args.repeats} for one session's decode), the two sides "
        "interleaved.",
        f"Machine: {benchlib.machine()}.",
        "",
        "| | paged (--kv-block-size 16) | contiguous (--kv-block-size 0) | ratio |",
        "|---|---:|---:|---:|",
        f"| sessions of max_length {MAX_LENGTH} admitted and served at once (each ~{args.prompt + args.tokens} "
        f"positions) | {len(group)} (exact: {exact}/{len(group)}) | {reserved} (exact: {exact8}/{len(outs8)}) | "
        f"{len(group) / reserved:.1f}x |",
        f"| their aggregate decode tok/s | {rate_paged:.1f} | {rate_contiguous:.1f} | "
        f"{rate_paged / rate_contiguous:.2f}x |",
        f"| one session's decode tok/s | {single_paged:.1f} | {single_contiguous:.1f} | "
        f"{single_paged / single_contiguous:.2f}x |",
        "",
        f"Blocks held at the peak (in use and cached) by the paged stage holding most: {peak}.",
        "",
        f"Time to first token with a {args.system}-token system prompt and a 20-token question: "
        f"{1e3 * ttft_cold:.0f} ms when the system prompt is new, {1e3 * ttft_warm:.0f} ms when the stages have "
        f"it cached: {ttft_cold / ttft_warm:.1f}x.",
        "",
        "Targets: >= 64 sessions admitted, all exact; time to first token >= 5x faster with the prefix "
        "cached; one session's decode >= 0.95x the contiguous cache.",
    ]
    benchlib.publish(lines, args.out, SECTION)


if __name__ == "__main__":
    main()
