"""What the commands share: argument types, the flags several commands take, and small helpers (one gRPC call to a
coordinator, the generation options of a parsed command line)."""

from __future__ import annotations

import argparse
import sys

from layerline import speculate
from layerline.errors import LayerlineError
from layerline.rate_limit import Rate, parse_rate

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def layer_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--split takes comma-separated layer counts like 5,2,4, got {text!r}"
        ) from None
    if not counts or any(c <= 0 for c in counts):
        raise argparse.ArgumentTypeError(f"--split counts must be positive, got {text!r}")
    return counts


def speculation(text: str) -> str:
    """--speculate: a proposer by name (ngram), an embedded model's name or a draft model's path."""
    problems = speculate.check(text, None)
    if problems:
        raise argparse.ArgumentTypeError(problems[0])
    return text


def rate(text: str) -> Rate:
    """--rate-limit: N/s, N/min or N/h."""
    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def not_a_range(text: str) -> list[int]:
    raise argparse.ArgumentTypeError(
        f"--layers A:B is one stage's range (layerline stage); give the layers of each stage as --split, e.g. "
        f"--split {text if ',' in text else '10,12,8'}"
    )


def add_layer_split(group: argparse._MutuallyExclusiveGroup) -> None:
    """--split: layers per stage. `--layers` belongs to `layerline stage` (a range A:B); here it is refused."""
    group.add_argument("--split", type=layer_counts, default=None, help="layers per stage, e.g. 10,12,8")
    group.add_argument("--layers", type=not_a_range, default=None, help=argparse.SUPPRESS)


def layer_range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes a range A:B like 0:15, got {text!r}") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"--layers range must have 0 <= A < B, got {text!r}")
    return a, b


def cpu_list(text: str) -> set[int]:
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


def size(text: str) -> int:
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("kmgib")
    try:
        value = float(number) * _UNITS[t[len(number) :]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like 2GiB, 512MiB or 1000000, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="embedded model name (smollm2), HF folder or .gguf file")


def add_split_args(p: argparse.ArgumentParser, default_stages: int, threads_help: str) -> None:
    """--model, how to cut it into stages, and each stage's dtype and threads."""
    add_model_args(p)
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--stages", type=positive, default=None, help=f"number of near-equal stages (default {default_stages})"
    )
    add_layer_split(split)
    add_weight_args(p)
    p.add_argument(
        "--devices",
        "--device",
        dest="devices",
        default="cpu",
        help="where the stages compute: auto (a CUDA GPU, else MPS, else the CPU), cpu, cuda, cuda:N or mps; one for "
        "all stages or one per stage, comma-separated (default cpu). Off the CPU, weights are held in the device's "
        "float dtype (CUDA: bf16, or fp16 without bf16; MPS: fp16) unless --dtype says otherwise",
    )
    p.add_argument("--threads", type=positive, default=None, help=threads_help)


def add_weight_args(p: argparse.ArgumentParser) -> None:
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


def weight_format(args: argparse.Namespace):
    from layerline.model import FLOAT_DTYPES
    from layerline.quant import resolve

    try:
        return resolve(FLOAT_DTYPES[args.dtype] if args.dtype else None, args.quantize)
    except ValueError as e:
        raise LayerlineError(str(e)) from None


def stage_devices(spec: str, stages: int) -> list[str]:
    """--devices / --device checked against what torch sees, one per stage (a DeviceError names the problem)."""
    from layerline.devices import resolve_devices

    return [str(d) for d in resolve_devices(spec, stages)]


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same tokens)")
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculate",
        type=speculation,
        default=None,
        metavar="ngram|stage|smollm2|PATH",
        help="speculative decoding, k proposals per pass through the stages, verified by the last stage (greedy "
        "output unchanged; sampling keeps its distribution): ngram = prompt lookup; stage = the draft model the "
        "first stage's host runs (layerline stage --draft); smollm2 or a model's path = a "
        "draft model with the same tokenizer, run greedily by this client",
    )
    p.add_argument("--speculate-k", type=positive, default=None, help="proposals per pass (default: adaptive, 1..16)")


def add_route_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--route", default="", help="the stages in order: host:port,host:port,...")
    p.add_argument("--coordinator", default="", help="host:port of a coordinator that names the stages")
    add_security_args(p)


def add_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (see `layerline certs`)")
    g.add_argument("--tls-cert", default="", help="PEM certificate: listen with TLS / present it to servers (mTLS)")
    g.add_argument("--tls-key", default="", help="the certificate's PEM private key")
    g.add_argument("--tls-ca", default="", help="PEM CA: check servers against it; servers require client certs")
    g.add_argument("--token-file", default="", help="shared token (default: $LAYERLINE_TOKEN): required / sent")


def security_of(args: argparse.Namespace):
    from layerline.security import Security

    return Security.from_files(args.tls_cert, args.tls_key, args.tls_ca, args.token_file)


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST is --host; 0: any free port; default: off)",
    )


def add_batch_args(p: argparse.ArgumentParser, file_help: str) -> None:
    p.add_argument("--file", default="", help=file_help)
    p.add_argument(
        "--micro-batch-size", type=positive, default=4, help="rows per micro-batch pushed through the stages (4)"
    )


def generation_options(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        **({"speculate": args.speculate, "speculate_k": args.speculate_k} if getattr(args, "speculate", None) else {}),
    }


def route_args(args: argparse.Namespace) -> list[str] | None:
    if bool(args.route) == bool(args.coordinator):
        raise LayerlineError("give either --route HOST:PORT,... or --coordinator HOST:PORT")
    return [a.strip() for a in args.route.split(",") if a.strip()] if args.route else None


def read_inputs(args: argparse.Namespace, single: str | None, what: str) -> list[str] | None:
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


def ask_coordinator(address: str, method: str, security=None):
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
            raise call_failed(e, f"the coordinator at {address}") from None


def call_failed(e, whom: str) -> LayerlineError:
    """A failed one-off gRPC call of the CLI as the error it prints: unreachable, or the server's message."""
    import grpc

    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return LayerlineError(f"{whom} is unreachable ({e.details()})")
    return LayerlineError(f"{e.details()} [{e.code().name}]")


def json_of(message) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(message, preserving_proto_field_name=True)
