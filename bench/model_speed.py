"""Model-core speed, layerline vs transformers on the same checkpoint and thread count, measured side by side in one
run: decode tokens/s at batch 1 and batch 8, and the time to prefill a 512-token prompt. Both sides run their own
generate loop (all layers in one process, float32, greedy) and every figure is the median of several repeats.

Decode rate = (N - 1) / (time to generate N tokens - time to generate 1 token), so prefill is excluded the same
way on both sides. Prints a markdown table with ratios (layerline / transformers; > 1 means layerline is faster).

    .venv/bin/python bench/model_speed.py [--threads 1] [--tokens 64] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import benchlib  # bench/benchlib.py, next to this script
import torch

from layerline.model_source import resolve_model
from layerline.pipeline import LocalPipeline


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per timed generation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    if os.path.isdir(path):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).eval()
    pipe = LocalPipeline.load(path, [(0, hf.config.num_hidden_layers)], torch.float32)
    vocab = pipe.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt1 = torch.randint(100, vocab, (1, 32), generator=g)
    prompt8 = torch.randint(100, vocab, (8, 32), generator=g)
    long_prompt = torch.randint(100, vocab, (1, 512), generator=g)

    def hf_gen(ids: torch.Tensor, n: int) -> None:
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out.shape[1] == ids.shape[1] + n

    def ll_gen(ids: torch.Tensor, n: int) -> None:
        out = pipe.generate_batch(ids.tolist(), n)
        assert all(len(o) == n for o in out)

    n = args.tokens
    rows = []
    results = {}
    for label, ids in (("decode tok/s, batch 1", prompt1), ("decode tok/s, batch 8", prompt8)):
        for side, fn in (("transformers", hf_gen), ("layerline", ll_gen)):
            fn(ids, 2)  # warm-up
            t_n = timed(lambda fn=fn, ids=ids: fn(ids, n), args.repeats)
            t_1 = timed(lambda fn=fn, ids=ids: fn(ids, 1), args.repeats)
            results[(label, side)] = ids.shape[0] * (n - 1) / (t_n - t_1)
        rows.append((label, results[(label, "transformers")], results[(label, "layerline")], True))
    label = "prefill 512 tokens, s"
    for side, fn in (("transformers", hf_gen), ("layerline", ll_gen)):
        fn(long_prompt, 1)
        results[(label, side)] = timed(lambda fn=fn: fn(long_prompt, 1), args.repeats)
    rows.append((label, results[(label, "transformers")], results[(label, "layerline")], False))

    lines = [
        f"Model-core speed: {os.path.basename(path)}, float32, one process, greedy; {n} decode tokens, "
        f"median of {args.repeats}.",
        f"Machine: {benchlib.machine()}.",
        "",
        "| measure | transformers | layerline | layerline / transformers |",
        "|---|---:|---:|---:|",
    ]
    for label, theirs, ours, higher_is_better in rows:
        ratio = ours / theirs if higher_is_better else theirs / ours
        lines.append(f"| {label} | {theirs:.2f} | {ours:.2f} | {ratio:.2f}x |")
    lines.append("")
    lines.append("Ratios > 1 mean layerline is faster (for prefill: transformers' time / layerline's time).")
    benchlib.publish(lines, args.out, "Model core vs transformers")


if __name__ == "__main__":
    main()
