"""The `layerline` command line: argument parsing, logging set-up and user-facing errors. The only place that reads
argv or configures logging; every command is a thin shell over the library.

Commands so far: `run` (a model split into stages inside this one process, streaming its answer) and `info`
(what a checkpoint is and how it would split).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from layerline.errors import LayerlineError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def _layer_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes comma-separated layer counts like 5,2,4, got {text!r}"
        ) from None
    if not counts or any(c <= 0 for c in counts):
        raise argparse.ArgumentTypeError(f"--layers counts must be positive, got {text!r}")
    return counts


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="embedded model name (smollm2), HF folder or .gguf file")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same tokens)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerline", description="Pipeline-parallel LLM inference over gRPC.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a model split into stages inside this process and stream its answer",
        description="Split the model into stages inside this one process (no network) and stream the answer.",
        epilog='example: layerline run --stages 3 "What is the capital of France?"',
    )
    _add_model_args(run)
    split = run.add_mutually_exclusive_group()
    split.add_argument("--stages", type=_positive, default=None, help="number of near-equal stages (default 1)")
    split.add_argument("--layers", type=_layer_counts, default=None, help="layers per stage, e.g. 10,12,8")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    run.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's choice)")
    _add_generation_args(run)
    run.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)

    info = sub.add_parser("info", help="describe a checkpoint", epilog="example: layerline info --model smollm2")
    _add_model_args(info)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from layerline.checkpoint import load_config
    from layerline.model import FLOAT_DTYPES
    from layerline.model_source import resolve_model
    from layerline.pipeline import LocalPipeline, split_layers
    from layerline.sampling import SamplingParams
    from layerline.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    config = load_config(path)
    try:
        ranges = split_layers(config.num_layers, args.stages or (None if args.layers else 1), args.layers)
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    except ValueError as e:
        raise LayerlineError(str(e)) from None
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_path(path)
    pipe = LocalPipeline.load(path, ranges, FLOAT_DTYPES[args.dtype])
    logger.info("loaded %s as stages %s in %.1f s", path, ranges, time.perf_counter() - t0)
    if args.raw or not tokenizer.chat_template:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    stops = config.eos_token_ids or tuple(tokenizer.eos_token_ids)
    tokens: list[int] = []
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    for tok in pipe.generate(prompt_ids, args.max_new_tokens, sampling, stops):
        tokens.append(tok)
        if not args.json:
            sys.stdout.write(decoder.push(tok))
            sys.stdout.flush()
    if args.json:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        print(json.dumps({"text": text, "token_ids": tokens, "prompt_token_ids": prompt_ids}))
    else:
        sys.stdout.write(decoder.flush() + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from layerline.checkpoint import open_checkpoint
    from layerline.model import expected_tensors
    from layerline.model_source import resolve_model

    path = resolve_model(args.model)
    ckpt = open_checkpoint(path)
    try:
        c = ckpt.config
        layer_bytes = ckpt.stored_bytes(list(expected_tensors(c, 0, 1)))
        print(f"model: {path}")
        for k, v in vars(c).items():
            print(f"  {k}: {v}")
        print(f"  stored bytes of one layer (+ embedding, first stage): {layer_bytes}")
    finally:
        ckpt.close()
    return 0


COMMANDS = {"run": cmd_run, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except LayerlineError as e:
        print(f"layerline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
