"""`layerline run` (a model split into stages inside this one process, no network) and `layerline info` (a
checkpoint, and the memory each stage of a split needs)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from layerline.cli.common import (
    DEFAULT_PROMPT,
    add_generation_args,
    add_layer_split,
    add_model_args,
    add_split_args,
    positive,
    stage_devices,
    weight_format,
)
from layerline.errors import LayerlineError

logger = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> dict:
    run = sub.add_parser(
        "run",
        help="run a model split into stages inside this process and stream its answer",
        description="Split the model into stages inside this one process (no network) and stream the answer.",
        epilog='example: layerline run --stages 3 "What is the capital of France?"',
    )
    add_split_args(run, default_stages=1, threads_help="torch threads (default: torch's choice)")
    add_generation_args(run)
    run.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the question (default: a sample one)")

    info = sub.add_parser(
        "info",
        help="describe a checkpoint and the memory each stage of a split needs",
        epilog="example: layerline info --model model.Q4_K_M.gguf --split 10,14",
    )
    add_model_args(info)
    split = info.add_mutually_exclusive_group()
    split.add_argument("--stages", type=positive, default=1, help="number of near-equal stages (default 1)")
    add_layer_split(split)
    return {"run": cmd_run, "info": cmd_info}


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from layerline.checkpoint import load_config
    from layerline.model_source import resolve_model
    from layerline.pipeline import LocalPipeline, split_layers
    from layerline.sampling import SamplingParams
    from layerline.text_stream import TextStream
    from layerline.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    config = load_config(path)
    try:
        ranges = split_layers(config.num_layers, args.stages or (None if args.split else 1), args.split)
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    except ValueError as e:
        raise LayerlineError(str(e)) from None
    devices = stage_devices(args.devices, len(ranges))
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_path(path)
    pipe = LocalPipeline.load(path, ranges, weights=weight_format(args), device=devices)
    logger.info(
        "loaded %s as stages %s in %.1f s: %.1f MiB of weights (%s)",
        path,
        ranges,
        time.perf_counter() - t0,
        sum(s.weight_bytes() for s in pipe.stages) / (1 << 20),
        pipe.stages[0].weight_summary(),
    )
    if args.raw or not tokenizer.chat_template:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    stops = config.eos_token_ids or tuple(tokenizer.eos_token_ids)
    stream = TextStream(tokenizer.stream_decoder(skip_special_tokens=True), args.stop, stops)
    tokens: list[int] = []
    for tok in pipe.generate(prompt_ids, args.max_new_tokens, sampling, stops):
        tokens.append(tok)
        delta = stream.push(tok, at_limit=len(tokens) >= args.max_new_tokens)
        if not args.json:
            sys.stdout.write(delta)
            sys.stdout.flush()
        if stream.finish_reason:
            break
    if args.json:
        print(json.dumps({"text": stream.text, "token_ids": tokens, "prompt_token_ids": prompt_ids}))
    else:
        sys.stdout.write("\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from layerline.checkpoint import open_checkpoint
    from layerline.coordinator.placement import WeightBytes
    from layerline.kv_cache import KVCache
    from layerline.model_source import resolve_model
    from layerline.pipeline import split_layers
    from layerline.quant import from_name
    from layerline.quant.layout import model_bytes

    path = resolve_model(args.model)
    ckpt = open_checkpoint(path)
    try:
        c, stored = ckpt.config, ckpt.stored_types()
        total = ckpt.total_bytes() if hasattr(ckpt, "total_bytes") else 0
    finally:
        ckpt.close()
    try:
        ranges = split_layers(c.num_layers, None if args.split else args.stages, args.split)
    except ValueError as e:
        raise LayerlineError(str(e)) from None
    print(f"model: {path}" + (f" ({total / 2**20:.1f} MiB)" if total else ""))
    for k, v in vars(c).items():
        print(f"  {k}: {v}")
    if stored:
        counts: dict[str, int] = {}
        for t in stored.values():
            counts[t] = counts.get(t, 0) + 1
        print("  tensor types: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    if c.moe_summary():
        print("  " + c.moe_summary())
    formats = ["stored", "float32", "bfloat16", "int8", "int4"]
    sizes = {f: WeightBytes(*model_bytes(c, from_name(f), stored)) for f in formats}
    kv = KVCache.bytes_needed(1, 1, c.num_kv_heads, c.head_dim, 1, 4)
    print(
        "weight memory per stage, MiB (stored = as the checkpoint holds them, the default; float32 = --dtype "
        "float32, the exact mode; int8 / int4 = --quantize); KV cache in float32: "
        f"{kv / 1024:.1f} KiB per layer per token"
    )
    print("  " + "stage".ljust(8) + "layers".ljust(10) + "".join(f.rjust(10) for f in formats))
    for i, (a, b) in enumerate(ranges):
        cells = [
            f"{sizes[f].for_range(a, b, c.num_layers, c.tie_word_embeddings) / 2**20:.1f}".rjust(10) for f in formats
        ]
        print("  " + str(i).ljust(8) + f"{a}:{b}".ljust(10) + "".join(cells))
    return 0
