"""The `layerline` command line: argument parsing, logging set-up and user-facing errors. The only place that reads
argv or configures logging; every command is a thin shell over the library.

Commands: `run` (stages inside this one process), `info` (a checkpoint), `stage` (serve a layer range), `generate`
(stream from running stages), `local` (stages on this machine, one answer), `coordinator` (registry and planner),
`status` and `plan` (ask a coordinator).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
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
            f"--split takes comma-separated layer counts like 5,2,4, got {text!r}"
        ) from None
    if not counts or any(c <= 0 for c in counts):
        raise argparse.ArgumentTypeError(f"--split counts must be positive, got {text!r}")
    return counts


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _not_a_range(text: str) -> list[int]:
    raise argparse.ArgumentTypeError(
        f"--layers A:B is one stage's range (layerline stage); give the layers of each stage as --split, e.g. "
        f"--split {text if ',' in text else '10,12,8'}"
    )


def _add_layer_split(group: argparse._MutuallyExclusiveGroup) -> None:
    """--split: layers per stage. `--layers` belongs to `layerline stage` (a range A:B); here it is refused."""
    group.add_argument("--split", type=_layer_counts, default=None, help="layers per stage, e.g. 10,12,8")
    group.add_argument("--layers", type=_not_a_range, default=None, help=argparse.SUPPRESS)


def _layer_range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes a range A:B like 0:15, got {text!r}") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"--layers range must have 0 <= A < B, got {text!r}")
    return a, b


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU numbers and ranges like 0-3,8, got {text!r}") from None
    return cpus


def _bytes(text: str) -> int:
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("kmgib")
    try:
        value = float(number) * _UNITS[t[len(number) :]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like 2GiB, 512MiB or 1000000, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="embedded model name (smollm2), HF folder or .gguf file")


def _add_split_args(p: argparse.ArgumentParser, default_stages: int, threads_help: str) -> None:
    """--model, how to cut it into stages, and each stage's dtype and threads."""
    _add_model_args(p)
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--stages", type=_positive, default=None, help=f"number of near-equal stages (default {default_stages})"
    )
    _add_layer_split(split)
    _add_weight_args(p)
    p.add_argument(
        "--devices",
        "--device",
        dest="devices",
        default="cpu",
        help="where the stages compute: auto (a CUDA GPU, else MPS, else the CPU), cpu, cuda, cuda:N or mps; one for "
        "all stages or one per stage, comma-separated (default cpu). Off the CPU, weights are held in the device's "
        "float dtype (CUDA: bf16, or fp16 without bf16; MPS: fp16) unless --dtype says otherwise",
    )
    p.add_argument("--threads", type=_positive, default=None, help=threads_help)


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    """--dtype and --quantize: how a stage holds its weights (layerline.quant.resolve)."""
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="exact mode: every weight dequantized to this dtype and computed in it (default: weights as the "
        "checkpoint stores them, GGUF blocks staying quantized, computed in float32)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default="",
        help="quantize float weights at load: int8 = Q8_0 (8 bits + a scale per 32), int4 = Q4_1 (4 bits + scale "
        "and minimum per 32)",
    )


def _weight_format(args: argparse.Namespace):
    from layerline.model import FLOAT_DTYPES
    from layerline.quant import resolve

    try:
        return resolve(FLOAT_DTYPES[args.dtype] if args.dtype else None, args.quantize)
    except ValueError as e:
        raise LayerlineError(str(e)) from None


def _devices(spec: str, stages: int) -> list[str]:
    """--devices / --device checked against what torch sees, one per stage (a DeviceError names the problem)."""
    from layerline.devices import resolve_devices

    return [str(d) for d in resolve_devices(spec, stages)]


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same tokens)")
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _add_route_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--route", default="", help="the stages in order: host:port,host:port,...")
    p.add_argument("--coordinator", default="", help="host:port of a coordinator that names the stages")
    _add_security_args(p)


def _add_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (see `layerline certs`)")
    g.add_argument("--tls-cert", default="", help="PEM certificate: listen with TLS / present it to servers (mTLS)")
    g.add_argument("--tls-key", default="", help="the certificate's PEM private key")
    g.add_argument("--tls-ca", default="", help="PEM CA: check servers against it; servers require client certs")
    g.add_argument("--token-file", default="", help="shared token (default: $LAYERLINE_TOKEN): required / sent")


def _security(args: argparse.Namespace):
    from layerline.security import Security

    return Security.from_files(args.tls_cert, args.tls_key, args.tls_ca, args.token_file)


def _add_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST is --host; 0: any free port; default: off)",
    )


def _add_batch_args(p: argparse.ArgumentParser, file_help: str) -> None:
    p.add_argument("--file", default="", help=file_help)
    p.add_argument(
        "--micro-batch-size", type=_positive, default=4, help="rows per micro-batch pushed through the stages (4)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerline", description="Pipeline-parallel LLM inference over gRPC.")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LAYERLINE_LOG_LEVEL", "WARNING").upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="DEBUG, INFO, WARNING (default; or $LAYERLINE_LOG_LEVEL) or ERROR",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("LAYERLINE_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text (default; or $LAYERLINE_LOG_FORMAT) or json: one object per line, with the session it is about",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a model split into stages inside this process and stream its answer",
        description="Split the model into stages inside this one process (no network) and stream the answer.",
        epilog='example: layerline run --stages 3 "What is the capital of France?"',
    )
    _add_split_args(run, default_stages=1, threads_help="torch threads (default: torch's choice)")
    _add_generation_args(run)
    run.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the question (default: a sample one)")

    info = sub.add_parser(
        "info",
        help="describe a checkpoint and the memory each stage of a split needs",
        epilog="example: layerline info --model model.Q4_K_M.gguf --split 10,14",
    )
    _add_model_args(info)
    split = info.add_mutually_exclusive_group()
    split.add_argument("--stages", type=_positive, default=1, help="number of near-equal stages (default 1)")
    _add_layer_split(split)

    stage = sub.add_parser(
        "stage",
        help="serve a range of a model's layers over gRPC",
        description="Serve layers [A, B) of a model as a stage server; prints a ready line with its address.",
        epilog="example: layerline stage --model smollm2 --layers 0:15 --port 7001 --next 10.0.0.2:7002",
    )
    stage.add_argument(
        "--model",
        default=None,
        help="embedded model name (smollm2), HF folder or .gguf file (default: smollm2 with --layers; with "
        "--coordinator and no --model, the layers' tensors are fetched from the coordinator and cached)",
    )
    stage.add_argument("--layers", type=_layer_range, help="the layer range A:B this stage serves")
    stage.add_argument(
        "--coordinator", default="", help="host:port of a coordinator: register there and serve the layers it assigns"
    )
    stage.add_argument("--max-memory", type=_bytes, default=0, help="memory for weights + KV (default: free memory)")
    stage.add_argument("--remeasure", action="store_true", help="measure capacity again instead of using the cache")
    stage.add_argument(
        "--capacity",
        default="",
        metavar="FILE",
        help="report the figures in FILE (an entry of the capacity cache, e.g. measured on a quiet machine) "
        "instead of measuring",
    )
    stage.add_argument(
        "--connect-timeout", type=float, default=20.0, help="seconds to wait for the coordinator at start (20)"
    )
    stage.add_argument(
        "--cache-dir", default="", help="where measured capacity and fetched weights are kept (~/.cache/layerline)"
    )
    stage.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    stage.add_argument("--port", type=int, default=0, help="port to listen on (default 0: any free port)")
    stage.add_argument("--advertise", default="", help="host:port other machines use to reach this stage")
    stage.add_argument("--next", default="", help="host:port of the next stage (sessions may name another)")
    _add_weight_args(stage)
    stage.add_argument(
        "--device",
        default="cpu",
        help="where this stage computes: auto (a CUDA GPU, else MPS, else the CPU), cpu, cuda, cuda:N or mps "
        "(default cpu); off the CPU, weights are held in the device's float dtype unless --dtype says otherwise",
    )
    stage.add_argument(
        "--wire-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the hidden states sent to the next stage (float32)",
    )
    stage.add_argument(
        "--kv-cache-bytes",
        type=_bytes,
        default=0,
        help="KV cache budget, e.g. 2GiB (default: 1/4 of --max-memory, else 1/4 of free RAM)",
    )
    stage.add_argument("--session-ttl", type=float, default=600.0, help="seconds an unused session lives (600)")
    stage.add_argument("--max-message-bytes", type=_bytes, default=64 << 20, help="largest gRPC message (64MiB)")
    stage.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    stage.add_argument(
        "--cpus",
        type=_cpu_list,
        default=None,
        help="run on these CPU cores only, e.g. 2 or 0-3,8 (several stages on one host: a core or set each)",
    )
    stage.add_argument(
        "--max-batch",
        type=_positive,
        default=16,
        help="decode steps of different sessions run as one forward pass, up to this many (16; 1: never)",
    )
    _add_security_args(stage)
    stage.add_argument(
        "--pack-weights",
        action="store_true",
        help="keep a second copy of the weights packed for oneDNN (float32 on CPU): steps of 4 rows or more "
        "(several sessions batched, micro-batches, prefill) multiply ~1.5x faster, for twice the weight memory",
    )
    stage.add_argument(
        "--max-queued-steps",
        type=_positive,
        default=64,
        help="steps queued for compute at most; senders wait beyond that (64)",
    )
    stage.add_argument(
        "--loop-ahead",
        type=_positive,
        default=32,
        help="a generation loop pauses while its reader is this many tokens behind (32)",
    )
    stage.add_argument(
        "--inline-below-ms",
        type=float,
        default=1.0,
        help="an idle stage computes decode steps that take less than this on its event loop, saving two thread "
        "hand-offs (1.0; 0: always on the compute thread)",
    )
    _add_metrics_args(stage)
    stage.add_argument(
        "--max-sessions-per-client",
        type=_positive,
        default=256,
        help="sessions one client may hold open on this stage (256)",
    )
    stage.add_argument(
        "--max-session-tokens",
        type=_positive,
        default=1 << 20,
        help="positions one session may hold, rows x max_length (1048576)",
    )

    api = sub.add_parser(
        "api",
        help="serve an OpenAI-compatible HTTP API and the cluster dashboard",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (streaming as server-sent events) "
        "over the cluster, the dashboard on / and Prometheus metrics on /metrics. Prints a ready line with the URL.",
        epilog="example: layerline api --coordinator 10.0.0.1:7000 --host 0.0.0.0 --port 8000\n"
        "then: OPENAI_BASE_URL=http://10.0.0.1:8000/v1 OPENAI_API_KEY=none any OpenAI client",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_route_args(api)
    api.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    api.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    api.add_argument("--model-name", default="", help="the model's name in the API (default: the checkpoint's name)")
    api.add_argument(
        "--api-key-file", default="", help="file holding the key clients must send (Authorization: Bearer KEY)"
    )
    api.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="seconds to wait at start for the cluster to have a working route, answering 503 meanwhile (300)",
    )

    drain = sub.add_parser(
        "drain",
        help="take a stage out of service without failing its sessions",
        description="Ask a running stage to leave: it leaves its coordinator (routes stop naming it at once), "
        "refuses new sessions, lets its sessions end for up to --wait seconds, then closes the rest with "
        "UNAVAILABLE (their clients move them to another chain and replay them) and shuts down. Waits until the "
        "stage is gone.",
        epilog="example: layerline drain 10.0.0.2:7002 --wait 60",
    )
    drain.add_argument("stage", help="host:port of the stage")
    drain.add_argument("--wait", type=float, default=30.0, help="seconds its sessions may go on (30)")
    drain.add_argument("--no-follow", action="store_true", help="return at once instead of waiting for the stage to go")
    _add_security_args(drain)

    gen = sub.add_parser(
        "generate",
        help="stream an answer from running stage servers",
        epilog='example: layerline generate --route 10.0.0.1:7001,10.0.0.2:7002 "Why is the sky blue?"',
    )
    _add_route_args(gen)
    _add_generation_args(gen)
    _add_batch_args(gen, "prompts, one per line (- = stdin): answered in micro-batches, printed in order")
    gen.add_argument("prompt", nargs="?", help="the prompt (or give --file)")

    score = sub.add_parser(
        "score",
        help="per-token log-probabilities and perplexity of texts",
        epilog="example: layerline score --route 10.0.0.1:7001,10.0.0.2:7002 --file texts.txt --micro-batch-size 4",
    )
    _add_route_args(score)
    _add_batch_args(score, "texts, one per line (- = stdin)")
    score.add_argument("--json", action="store_true", help="one JSON object per text, with every token's log-prob")
    score.add_argument("text", nargs="?", help="the text to score (or give --file)")

    local = sub.add_parser(
        "local",
        help="start stage servers on this machine, stream an answer, stop them",
        description="Start the stage servers as separate processes on 127.0.0.1, stream the answer through them "
        "over gRPC, and shut everything down (also on Ctrl-C).",
        epilog='example: layerline local --stages 3 "What is the capital of France?"',
    )
    _add_split_args(local, default_stages=3, threads_help="torch threads per stage (default: cores/stages)")
    local.add_argument(
        "--pin",
        action="store_true",
        help="give each stage a core of its own (when there are as many cores as stages): helps small models, can "
        "hurt bigger ones that need memory bandwidth more than cache",
    )
    _add_generation_args(local)
    local.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the question (default: a sample one)")

    coord = sub.add_parser(
        "coordinator",
        help="run the coordinator: registry of stages and planner of their layer ranges",
        description="Serve the Coordinator service for one model: stages register with their measured capacity and "
        "heartbeat; it assigns contiguous layer ranges (slowest stage as fast as possible, within each stage's "
        "memory) and answers clients' route requests. Stage hosts without the checkpoint fetch their layers from it.",
        epilog="example: layerline coordinator --model smollm2 --host 0.0.0.0 --port 7000",
    )
    _add_model_args(coord)
    coord.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    coord.add_argument("--port", type=int, default=7000, help="port to listen on (default 7000; 0: any free port)")
    coord.add_argument("--heartbeat", type=float, default=2.0, help="seconds between stage heartbeats (2)")
    coord.add_argument("--settle", type=float, default=4.0, help="seconds the first plan waits for stages (4)")
    coord.add_argument("--expect", type=int, default=0, help="plan as soon as this many stages have registered")
    coord.add_argument(
        "--refine",
        type=float,
        default=30.0,
        help="re-plan at most this often (seconds) from the stages' speed observed under load (30; 0: never)",
    )
    _add_weight_args(coord)  # the weights' form for stages that fetch them and give none of their own
    _add_metrics_args(coord)
    _add_security_args(coord)

    certs = sub.add_parser(
        "certs",
        help="make a private CA, a certificate for the cluster's hosts, and a token",
        description="Write ca.pem, ca.key, node.pem, node.key and token into a folder: give every process "
        "--tls-cert node.pem --tls-key node.key --tls-ca ca.pem --token-file token (mutual TLS and a token on every "
        "link). Keep ca.key somewhere safe, or delete it.",
        epilog="example: layerline certs --out ./certs --hosts 10.0.0.1,10.0.0.2,gpu-box,localhost,127.0.0.1",
    )
    certs.add_argument("--out", required=True, help="folder to write into")
    certs.add_argument("--hosts", required=True, help="comma-separated host names and IP addresses of the cluster")
    certs.add_argument("--days", type=_positive, default=825, help="validity in days (825)")

    for name, text in (
        ("status", "a table of the registered stages, their ranges, measured speed, memory and health"),
        ("plan", "what the coordinator would assign now, and why (dry run)"),
    ):
        p = sub.add_parser(name, help=text, epilog=f"example: layerline {name} --coordinator 10.0.0.1:7000")
        p.add_argument("--coordinator", required=True, help="host:port of the coordinator")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        _add_security_args(p)
    return parser


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
    devices = _devices(args.devices, len(ranges))
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_path(path)
    pipe = LocalPipeline.load(path, ranges, weights=_weight_format(args), device=devices)
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


def _fewer_malloc_arenas() -> None:
    """glibc gives each thread that allocates an arena of its own (up to 8 per core), and the free pages of each
    stay resident: a stage's gRPC, compute and OpenMP threads allocate little, so two arenas do (some MiB less
    resident memory per stage, measured). Before any thread starts; a MALLOC_ARENA_MAX the user set stands."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


def cmd_stage(args: argparse.Namespace) -> int:
    import asyncio

    from layerline.local_cluster import die_with_parent
    from layerline.model import FLOAT_DTYPES
    from layerline.model_source import DEFAULT_MODEL, resolve_model
    from layerline.stage_server.config import StageConfig
    from layerline.stage_server.server import print_ready, print_serving, serve

    die_with_parent()
    _fewer_malloc_arenas()
    if args.cpus is not None:
        try:
            os.sched_setaffinity(0, args.cpus)  # before torch starts any thread: they all inherit it
        except (OSError, AttributeError) as e:
            raise LayerlineError(f"--cpus {sorted(args.cpus)}: {getattr(e, 'strerror', None) or e}") from None
    if args.layers is None and not args.coordinator:
        raise LayerlineError("give --layers A:B, or --coordinator HOST:PORT to be assigned layers")
    if args.capacity and not args.coordinator:
        raise LayerlineError("--capacity is what a stage reports to a coordinator: give --coordinator HOST:PORT too")
    start, end = args.layers if args.layers is not None else (0, 0)
    model = args.model
    if model is None and args.layers is not None:
        model = DEFAULT_MODEL  # no coordinator to fetch from: the embedded default
    try:
        config = StageConfig(
            model=resolve_model(model) if model is not None else "",  # "": fetched from the coordinator
            start=start,
            end=end,
            host=args.host,
            port=args.port,
            advertise=args.advertise,
            next_address=args.next,
            dtype=FLOAT_DTYPES[args.dtype] if args.dtype else None,
            quantize=args.quantize,
            device=args.device,
            wire_dtype=FLOAT_DTYPES[args.wire_dtype],
            # with --max-memory, the KV budget defaults to a quarter of it (it is part of what the stage gives)
            kv_cache_bytes=args.kv_cache_bytes or args.max_memory // 4,
            session_ttl=args.session_ttl,
            max_message_bytes=args.max_message_bytes,
            threads=args.threads,
            max_batch=args.max_batch,
            pack_weights=args.pack_weights,
            max_queued_steps=args.max_queued_steps,
            loop_ahead=args.loop_ahead,
            max_sessions_per_client=args.max_sessions_per_client,
            max_session_tokens=args.max_session_tokens,
            metrics_port=args.metrics_port,
            inline_compute_s=args.inline_below_ms / 1e3,
            security=_security(args),
        )
    except ValueError as e:
        raise LayerlineError(str(e)) from None
    if args.max_memory and config.kv_cache_bytes >= args.max_memory:
        raise LayerlineError(
            f"--kv-cache-bytes ({config.kv_cache_bytes}) leaves nothing of --max-memory ({args.max_memory}) for weights"
        )
    asyncio.run(
        serve(
            config,
            on_ready=print_ready,
            coordinator=args.coordinator,
            max_memory=args.max_memory,
            remeasure=args.remeasure,
            cache_dir=args.cache_dir,
            connect_timeout=args.connect_timeout,
            capacity_file=args.capacity,
            on_layers=print_serving,
        )
    )
    return 0


def _options(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }


def _stream_answer(route: list[str] | None, args: argparse.Namespace, coordinator: str = "") -> int:
    """Generate through the stages at `route` (or the coordinator's route) and print the answer (streamed text, or
    one JSON object)."""
    from layerline.client import Client, ClientConfig

    security = _security(args) if hasattr(args, "tls_cert") else None
    config = ClientConfig(security=security) if security is not None else None
    with Client(route, coordinator=coordinator, config=config) as client:
        tok = client.tokenizer()
        if args.raw or tok is None or not tok.chat_template:
            pieces = client.generate(args.prompt, **_options(args))
        else:
            pieces = client.chat([{"role": "user", "content": args.prompt}], **_options(args))
        ids = []
        for piece in pieces:
            ids.append(piece.token_id)
            if not args.json:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
        if args.json:
            prompt_ids = (
                tok.encode(args.prompt)
                if (args.raw or not tok.chat_template)
                else tok.encode_chat([{"role": "user", "content": args.prompt}])
            )
            text = tok.decode(ids, skip_special_tokens=True)
            print(json.dumps({"text": text, "token_ids": ids, "prompt_token_ids": prompt_ids}))
        else:
            sys.stdout.write("\n")
    return 0


def _route_args(args: argparse.Namespace) -> list[str] | None:
    if bool(args.route) == bool(args.coordinator):
        raise LayerlineError("give either --route HOST:PORT,... or --coordinator HOST:PORT")
    return [a.strip() for a in args.route.split(",") if a.strip()] if args.route else None


def _inputs(args: argparse.Namespace, single: str | None, what: str) -> list[str] | None:
    """The lines of --file (blank ones skipped), or None when a single `what` is given instead."""
    if bool(args.file) == (single is not None):
        raise LayerlineError(f"give either a {what} or --file FILE (one {what} per line)")
    if not args.file:
        return None
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LayerlineError(f"cannot read --file {args.file}: {e}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise LayerlineError(f"--file {args.file} holds no {what}s (one per line)")
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    route = _route_args(args)
    prompts = _inputs(args, args.prompt, "prompt")
    if prompts is None:
        return _stream_answer(route, args, coordinator=args.coordinator)
    from layerline.client import Client, ClientConfig

    with Client(route, coordinator=args.coordinator, config=ClientConfig(security=_security(args))) as client:
        tok = client.tokenizer()
        chat = not args.raw and tok is not None and bool(tok.chat_template)
        asked = [tok.encode_chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
        answers = client.generate_batch(asked, micro_batch_size=args.micro_batch_size, **_options(args))
    for i, (prompt, g) in enumerate(zip(prompts, answers, strict=True)):
        if args.json:
            print(
                json.dumps(
                    {"prompt": prompt, "text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason}
                )
            )
        else:
            print(f"[{i + 1}] {g.text}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from layerline.client import Client, ClientConfig

    route = _route_args(args)
    texts = _inputs(args, args.text, "text") or [args.text]
    with Client(route, coordinator=args.coordinator, config=ClientConfig(security=_security(args))) as client:
        tok = client.tokenizer()
        if tok is None:
            raise LayerlineError("the stages serve no tokenizer, so texts cannot be scored from the command line")
        ids = [tok.encode(t) for t in texts]
        scores = client.score(ids, micro_batch_size=args.micro_batch_size)
    for text, seq, lps in zip(texts, ids, scores, strict=True):
        total = sum(lps)
        ppl = math.exp(-total / len(lps)) if lps else float("nan")
        if args.json:
            out = {"text": text, "token_ids": seq, "logprobs": lps, "total": total, "perplexity": ppl}
            print(json.dumps(out))
        else:
            print(f"{len(lps)} tokens scored, log-prob {total:.3f}, perplexity {ppl:.3f}: {text}")
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    """`--split 5,2,4`: exactly that split. Otherwise a coordinator places `--stages N` stages (default 3) by their
    measured capacity, as on a real cluster."""
    from layerline.checkpoint import load_config
    from layerline.local_cluster import LocalCluster, LocalCoordinator
    from layerline.model_source import resolve_model
    from layerline.pipeline import split_layers

    path = resolve_model(args.model)
    config = load_config(path)
    if args.split:
        try:
            ranges = split_layers(config.num_layers, None, args.split)
        except ValueError as e:
            raise LayerlineError(str(e)) from None
        devices = _devices(args.devices, len(ranges))
        with LocalCluster(
            path, ranges, dtype=args.dtype, quantize=args.quantize, threads=args.threads, pin=args.pin, devices=devices
        ) as cluster:
            logger.info("stages %s at %s", ranges, cluster.route)
            return _stream_answer(cluster.route, args)
    stages = args.stages or 3
    if stages > config.num_layers:
        raise LayerlineError(f"{stages} stages for a model of {config.num_layers} layers: use at most that many")
    devices = _devices(args.devices, stages)
    with LocalCoordinator(path, heartbeat=1.0, settle=120.0, expect=stages) as coordinator:
        with LocalCluster(
            path,
            [None] * stages,
            coordinator=coordinator.address,
            dtype=args.dtype,
            quantize=args.quantize,
            threads=args.threads,
            pin=args.pin,
            devices=devices,
        ):
            route = _wait_for_route(coordinator.address, timeout=300.0)
            logger.info("coordinator %s placed the stages: %s", coordinator.address, route)
            return _stream_answer(None, args, coordinator=coordinator.address)


def _wait_for_route(address: str, timeout: float) -> list[str]:
    """Until the coordinator's plan is loaded on every stage it uses; its route."""
    deadline = time.monotonic() + timeout
    while True:
        status = _ask_coordinator(address, "Status")
        assigned = [s for s in status.stages if s.assignment.end_layer > s.assignment.start_layer]
        loaded = all(
            (s.serving_start, s.serving_end) == (s.assignment.start_layer, s.assignment.end_layer) for s in assigned
        )
        if status.route.addresses and assigned and loaded:
            return list(status.route.addresses)
        if time.monotonic() > deadline:
            why = status.problem or "the stages did not load their layers in time"
            raise LayerlineError(f"no route from the coordinator after {timeout:g} s: {why}")
        time.sleep(0.2)


def cmd_coordinator(args: argparse.Namespace) -> int:
    import asyncio

    from layerline.coordinator.service import serve_coordinator
    from layerline.local_cluster import COORDINATOR_READY, die_with_parent
    from layerline.model_source import resolve_model

    die_with_parent()

    def ready(running) -> None:
        metrics = f" (metrics on http://{running.metrics}/metrics)" if running.metrics else ""
        print(f"{COORDINATOR_READY}{args.model} listening on {running.address}{metrics}", flush=True)

    asyncio.run(
        serve_coordinator(
            resolve_model(args.model),
            args.host,
            args.port,
            on_ready=ready,
            heartbeat_s=args.heartbeat,
            settle_s=args.settle,
            expected_stages=args.expect,
            security=_security(args),
            metrics_port=args.metrics_port,
            refine_s=args.refine,
            weights=_weight_format(args),
        )
    )
    return 0


def _ask_coordinator(address: str, method: str, security=None):
    """One unary call to the coordinator, with the failure as a LayerlineError that says what went wrong."""
    import grpc

    from layerline.security import Security
    from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc

    security = security or Security()
    requests = {"Status": coordinator_pb2.StatusRequest(), "Plan": coordinator_pb2.PlanRequest()}
    with security.sync_channel(address) as channel:
        try:
            return getattr(coordinator_pb2_grpc.CoordinatorStub(channel), method)(
                requests[method], timeout=10, metadata=security.metadata()
            )
        except grpc.RpcError as e:
            raise _call_failed(e, f"the coordinator at {address}") from None


def _call_failed(e, whom: str) -> LayerlineError:
    """A failed one-off gRPC call of the CLI as the error it prints: unreachable, or the server's message."""
    import grpc

    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return LayerlineError(f"{whom} is unreachable ({e.details()})")
    return LayerlineError(f"{e.details()} [{e.code().name}]")


def _json_of(message) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(message, preserving_proto_field_name=True)


def _memory_cell(s) -> str:
    """What a stage holds on its device of the device's total (a GPU's own memory; the host's for a CPU stage);
    before its first heartbeat, the memory it offered the model."""
    if not s.device_memory_total:
        return (f"{s.resident_bytes / (1 << 20):.0f} MiB of " if s.resident_bytes else "") + (
            f"{s.report.memory_bytes / (1 << 30):.2f} GiB"
        )
    return f"{s.device_memory_used / (1 << 20):.0f} MiB of {s.device_memory_total / (1 << 30):.1f} GiB"


def cmd_status(args: argparse.Namespace) -> int:
    status = _ask_coordinator(args.coordinator, "Status", _security(args))
    if args.json:
        print(_json_of(status))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    table = Table(
        title=f"model {status.model_name}: {status.num_layers} layers, plan version {status.plan_version}",
        title_justify="left",
    )
    numbers = {"ms/layer decode", "load", "us/layer/token prefill", "weights", "memory", "KV used", "sessions"}
    for name in (
        "stage",
        "address",
        "device/dtype",
        "layers",
        "assigned",
        "ms/layer decode",
        "load",
        "us/layer/token prefill",
        "weights",
        "memory",
        "KV used",
        "sessions",
        "health",
    ):
        table.add_column(name, no_wrap=True, justify="right" if name in numbers else "left")
    for s in status.stages:
        r = s.report
        serving = f"{s.serving_start}:{s.serving_end}" if s.serving_end else "-"
        assigned = f"{s.assignment.start_layer}:{s.assignment.end_layer}" if s.assignment.end_layer else "standby"
        if s.replica:
            assigned += " (replica)"
        health = ("[green]ready[/green]" if s.ready else "[yellow]loading[/yellow]") + (
            f", seen {s.seconds_since_heartbeat:.1f}s ago"
        )
        table.add_row(
            s.stage_id[:8],
            r.address,
            f"{r.device}/{r.dtype}",
            serving,
            assigned,
            f"{1e3 * r.decode_s_per_layer:.2f}",
            f"x{s.load_factor:.2f}" if s.load_factor else "-",
            f"{1e6 * r.prefill_s_per_layer_token:.1f}",
            f"{s.weight_bytes / (1 << 20):.1f} MiB {r.weights or r.dtype}" if s.weight_bytes else "-",
            _memory_cell(s),
            f"{s.kv_bytes_used / (1 << 20):.1f} MiB",
            str(s.open_sessions),
            health,
        )
    console.print(table)
    named = [
        f"{s.stage_id[:8]} {s.report.device}: {s.report.device_name}" for s in status.stages if s.report.device_name
    ]
    if named:
        print("devices: " + "; ".join(named))
    if status.predicted_bottleneck_s:
        print(
            f"predicted bottleneck {1e3 * status.predicted_bottleneck_s:.2f} ms/token, one token through the chain "
            f"{1e3 * status.predicted_total_s:.2f} ms"
        )
    if status.route.addresses:
        print("route: " + ",".join(status.route.addresses))
    else:
        print("route: none yet" + (f" ({status.problem})" if status.problem else ""))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _ask_coordinator(args.coordinator, "Plan", _security(args))
    print(_json_of(plan) if args.json else plan.explanation)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from layerline.api import serve_api
    from layerline.client import AsyncClient, ClientConfig
    from layerline.local_cluster import API_READY, die_with_parent

    die_with_parent()
    route = _route_args(args)
    api_key = ""
    if args.api_key_file:
        try:
            with open(args.api_key_file) as f:
                api_key = f.read().strip()
        except OSError as e:
            raise LayerlineError(f"cannot read --api-key-file {args.api_key_file}: {e.strerror or e}") from None
        if not api_key:
            raise LayerlineError(f"--api-key-file {args.api_key_file} is empty")
    security = _security(args)

    async def main() -> None:
        client = AsyncClient(route, coordinator=args.coordinator, config=ClientConfig(security=security))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(host: str, port: int, name: str) -> None:
            print(f"{API_READY}http://{host}:{port} (model {name!r}; dashboard on /, OpenAI API on /v1)", flush=True)

        await serve_api(
            client,
            args.model_name,
            args.host,
            args.port,
            coordinator=args.coordinator,
            route=route,
            security=security,
            api_key=api_key,
            connect_timeout=args.connect_timeout,
            on_ready=ready,
            stop=stop,
        )

    asyncio.run(main())
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    import grpc

    from layerline.v1 import stage_pb2, stage_pb2_grpc

    security = _security(args)
    if not args.wait > 0:
        raise LayerlineError(f"--wait must be positive, got {args.wait}")
    with security.sync_channel(args.stage) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        try:
            reply = stub.Drain(stage_pb2.DrainRequest(wait_seconds=args.wait), timeout=10, metadata=security.metadata())
        except grpc.RpcError as e:
            raise _call_failed(e, f"the stage at {args.stage}") from None
        print(
            f"draining {reply.stage} at {args.stage}: {reply.open_sessions} sessions open, they get up to "
            f"{args.wait:g} s before they move to another chain",
            flush=True,
        )
        if args.no_follow:
            return 0
        deadline = time.monotonic() + args.wait + 60  # its sessions' time, then the shutdown's grace
        while time.monotonic() < deadline:
            try:
                info = stub.Info(stage_pb2.InfoRequest(), timeout=5, metadata=security.metadata())
            except grpc.RpcError:
                print(f"the stage at {args.stage} is gone")
                return 0
            time.sleep(0.5 if info.open_sessions else 0.2)
    raise LayerlineError(f"the stage at {args.stage} still answers {args.wait + 60:g} s after the drain began")


def cmd_certs(args: argparse.Namespace) -> int:
    from layerline.security import make_certificates

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        paths = make_certificates(args.out, hosts, args.days)
    except OSError as e:
        raise LayerlineError(f"cannot write into {args.out}: {e.strerror or e}") from None
    print(f"wrote {', '.join(paths.values())}")
    print(
        "give every stage, coordinator and client: --tls-cert {} --tls-key {} --tls-ca {} --token-file {}".format(
            paths["node.pem"], paths["node.key"], paths["ca.pem"], paths["token"]
        )
    )
    return 0


COMMANDS = {
    "run": cmd_run,
    "info": cmd_info,
    "stage": cmd_stage,
    "generate": cmd_generate,
    "score": cmd_score,
    "local": cmd_local,
    "coordinator": cmd_coordinator,
    "status": cmd_status,
    "plan": cmd_plan,
    "certs": cmd_certs,
    "drain": cmd_drain,
    "api": cmd_api,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from layerline import logs

    logs.setup(args.log_level, args.log_format)
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
