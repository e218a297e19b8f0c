"""Decode speed on a CUDA GPU, layerline vs transformers' `generate` on the same GPU, the same random checkpoint and
dtype, measured side by side in one run: tokens/s at batch 1 and batch 8, for a model of SmolLM2-135M's shape and
one of a ~1B Llama's shape (Llama 3.2 1B), randomly initialised (no model files needed, nothing downloaded).

Decode rate = (N - 1) x batch / (time to generate N tokens - time to generate 1 token): prefill is excluded the
same way on both sides. Repeats are interleaved (layerline, transformers, layerline, ...) and every figure is a
median. Writes the figures as JSON to --out and prints a markdown table; ratio > 1 means layerline is faster.

    python bench/gpu_decode.py [--tokens 64] [--repeats 3] [--shapes smollm2,llama-1b] --out FIGURES.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}


def _rate(run, n: int, batch: int, device: str) -> float:
    """tokens/s of decode: (n - 1) steps x batch rows over the time beyond a 1-token run."""
    from layerline.devices import synchronize

    synchronize(device)
    t = time.perf_counter()
    run(1)
    synchronize(device)
    one = time.perf_counter() - t
    t = time.perf_counter()
    run(n)
    synchronize(device)
    full = time.perf_counter() - t
    return (n - 1) * batch / max(full - one, 1e-9)


def build(shape: str, folder: str, dtype: torch.dtype, device: str):
    import transformers

    config = transformers.LlamaConfig(
        **SHAPES[shape], max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(folder)
    return model


def rates(pipe, ref, batch: int, tokens: int, repeats: int, device: str) -> dict:
    """Decode tok/s of both sides at `batch` rows of a 32-token random prompt, interleaved repeats, medians."""
    prompts = torch.randint(0, ref.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
    ids = prompts.to(device)

    def ours(n: int) -> None:
        if batch == 1:
            list(pipe.generate(prompts[0].tolist(), n))
        else:
            pipe.generate_batch(prompts.tolist(), n)

    def theirs(n: int) -> None:
        with torch.no_grad():
            ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    ours(4), theirs(4)  # warm-up: kernels chosen, allocator grown
    a, b = [], []
    for _ in range(repeats):
        a.append(_rate(ours, tokens, batch, device))
        b.append(_rate(theirs, tokens, batch, device))
    return {
        "layerline_tok_s": statistics.median(a),
        "transformers_tok_s": statistics.median(b),
        "ratio": statistics.median(a) / statistics.median(b),
    }


def measure(shape: str, tokens: int, repeats: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    from layerline.pipeline import LocalPipeline

    out: dict = {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens}
    with tempfile.TemporaryDirectory() as folder:
        ref = build(shape, folder, dtype, device)
        pipe = LocalPipeline.load(folder, [(0, ref.config.num_hidden_layers)], dtype, device=device)
        for batch in (1, 8):
            out[f"batch{batch}"] = rates(pipe, ref, batch, tokens, repeats, device)
    del pipe, ref
    if device != "cpu":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of this script)")
    args = p.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error("torch sees no CUDA GPU here")
    from layerline.devices import device_name

    figures = {
        "gpu": device_name(args.device),
        "torch": torch.__version__,
        "cuda_graphs": "not built: the decode step is not captured yet (eager kernels only)",
        "int4_on_cuda": "not built: on a GPU quantized blocks are dequantized to the GPU's float dtype at load",
        "runs": [],
    }
    if args.device == "cpu":
        dtype = torch.float32
    else:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    for shape in args.shapes.split(","):
        figures["runs"].append(measure(shape.strip(), args.tokens, args.repeats, dtype, args.device))
        with open(args.out, "w") as f:  # written after every shape: a run cut short keeps what it measured
            json.dump(figures, f, indent=2)
    print(f"GPU {figures['gpu']}, torch {figures['torch']}, decode tok/s (median of {args.repeats}), eager")
    print("| shape | dtype | batch | layerline | transformers | ratio |")
    print("|---|---|---|---|---|---|")
    for run in figures["runs"]:
        for batch in (1, 8):
            r = run[f"batch{batch}"]
            print(
                f"| {run['shape']} | {run['dtype']} | {batch} | {r['layerline_tok_s']:.1f} | "
                f"{r['transformers_tok_s']:.1f} | {r['ratio']:.2f}x |"
            )
    print(f"figures: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
