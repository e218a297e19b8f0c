"""The commands that send work to stages: `generate` and `score` (over running stages, named by a route or a
coordinator) and `local` (stages started on this machine for one answer, then stopped)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence

from layerline.cli.common import (
    DEFAULT_PROMPT,
    add_batch_args,
    add_generation_args,
    add_route_args,
    add_speculation_args,
    add_split_args,
    ask_coordinator,
    generation_options,
    read_inputs,
    route_args,
    security_of,
    stage_devices,
)
from layerline.errors import LayerlineError

logger = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> dict:
    gen = sub.add_parser(
        "generate",
        help="stream an answer from running stage servers",
        epilog='example: layerline generate --route 10.0.0.1:7001,10.0.0.2:7002 "Why is the sky blue?"',
    )
    add_route_args(gen)
    add_generation_args(gen)
    add_speculation_args(gen)
    add_batch_args(gen, "prompts, one per line (- = stdin): answered in micro-batches, printed in order")
    gen.add_argument("prompt", nargs="?", help="the prompt (or give --file)")

    score = sub.add_parser(
        "score",
        help="per-token log-probabilities and perplexity of texts",
        epilog="example: layerline score --route 10.0.0.1:7001,10.0.0.2:7002 --file texts.txt --micro-batch-size 4",
    )
    add_route_args(score)
    add_batch_args(score, "texts, one per line (- = stdin)")
    score.add_argument("--json", action="store_true", help="one JSON object per text, with every token's log-prob")
    score.add_argument("text", nargs="?", help="the text to score (or give --file)")

    local = sub.add_parser(
        "local",
        help="start stage servers on this machine, stream an answer, stop them",
        description="Start the stage servers as separate processes on 127.0.0.1, stream the answer through them "
        "over gRPC, and shut everything down (also on Ctrl-C).",
        epilog='example: layerline local --stages 3 "What is the capital of France?"',
    )
    add_split_args(local, default_stages=3, threads_help="torch threads per stage (default: cores/stages)")
    local.add_argument(
        "--pin",
        action="store_true",
        help="give each stage a core of its own (when there are as many cores as stages): helps small models, can "
        "hurt bigger ones that need memory bandwidth more than cache",
    )
    add_generation_args(local)
    add_speculation_args(local)
    local.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the question (default: a sample one)")
    return {"generate": cmd_generate, "score": cmd_score, "local": cmd_local}


def print_failover(moved) -> None:
    """A move to another chain as one note on stderr, on a line of its own (the answer on stdout stays whole)."""
    sys.stdout.flush()
    apart = "\n" if sys.stdout.isatty() and sys.stderr.isatty() else ""  # the answer's line is open on the screen
    print(apart + moved.note(), file=sys.stderr, flush=True)


def client_config(args: argparse.Namespace):
    from layerline.client import ClientConfig

    return ClientConfig(security=security_of(args), on_failover=print_failover)


def stream_answer(
    route: list[str] | None, args: argparse.Namespace, coordinator: str = "", header: Sequence[str] = ()
) -> int:
    """Generate through the stages at `route` (or the coordinator's route) and print the answer (streamed text, or
    one JSON object). Streaming, the `header` lines go to stderr first, and an answer cut at --max-new-tokens says
    so there after it."""
    from layerline.client import Client, ClientConfig

    # `local` has no security flags: its own stages on this machine
    config = client_config(args) if hasattr(args, "tls_cert") else ClientConfig(on_failover=print_failover)
    with Client(route, coordinator=coordinator, config=config) as client:
        tok = client.tokenizer()
        if args.raw or tok is None or not tok.chat_template:
            pieces = client.generate(args.prompt, **generation_options(args))
        else:
            pieces = client.chat([{"role": "user", "content": args.prompt}], **generation_options(args))
        if header and not args.json:
            print("\n".join(header), file=sys.stderr, flush=True)
        ids, finish = [], ""
        for piece in pieces:
            ids.append(piece.token_id)
            finish = piece.finish_reason or finish
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
            sys.stdout.flush()
            if finish == "length":
                print(
                    f"[the answer was cut at {len(ids)} tokens: --max-new-tokens {args.max_new_tokens}]",
                    file=sys.stderr,
                )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    route = route_args(args)
    prompts = read_inputs(args, args.prompt, "prompt")
    if prompts is None:
        return stream_answer(route, args, coordinator=args.coordinator)
    from layerline.client import Client

    with Client(route, coordinator=args.coordinator, config=client_config(args)) as client:
        tok = client.tokenizer()
        chat = not args.raw and tok is not None and bool(tok.chat_template)
        asked = [tok.encode_chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
        answers = client.generate_batch(asked, micro_batch_size=args.micro_batch_size, **generation_options(args))
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
    from layerline.client import Client

    route = route_args(args)
    texts = read_inputs(args, args.text, "text") or [args.text]
    with Client(route, coordinator=args.coordinator, config=client_config(args)) as client:
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
    measured capacity, as on a real cluster, for pipelined sessions (the throughput objective), so that all N take
    part: a coordinator's default objective would serve a model that fits one stage from one."""
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
        devices = stage_devices(args.devices, len(ranges))
        with LocalCluster(
            path, ranges, dtype=args.dtype, quantize=args.quantize, threads=args.threads, pin=args.pin, devices=devices
        ) as cluster:
            logger.info("stages %s at %s", ranges, cluster.route)
            spans = [f"{a}:{b}" for a, b in ranges]
            return stream_answer(cluster.route, args, header=_header(args, path, cluster.route, spans, "as given"))
    stages = args.stages or 3
    if stages > config.num_layers:
        raise LayerlineError(f"{stages} stages for a model of {config.num_layers} layers: use at most that many")
    devices = stage_devices(args.devices, stages)
    with LocalCoordinator(path, heartbeat=1.0, settle=120.0, expect=stages, objective="throughput") as coordinator:
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
            route = wait_for_route(coordinator.address, timeout=300.0)
            logger.info("coordinator %s placed the stages: %s", coordinator.address, route)
            serving = {s.report.address: s for s in ask_coordinator(coordinator.address, "Status").stages}
            spans = [f"{serving[a].serving_start}:{serving[a].serving_end}" if a in serving else "?" for a in route]
            how = f"placed by the coordinator at {coordinator.address} by their measured speed"
            header = _header(args, path, route, spans, how)
            return stream_answer(None, args, coordinator=coordinator.address, header=header)


def _header(args: argparse.Namespace, model: str, route: list[str], spans: list[str], how: str) -> list[str]:
    """What `local` says before the answer: the question, and which stage serves which layers."""
    lines = [f"question: {args.prompt}", f"model: {os.path.basename(model.rstrip('/'))}, {len(route)} stages ({how}):"]
    lines += [f"  stage {i + 1} at {a}: layers {span}" for i, (a, span) in enumerate(zip(route, spans, strict=True))]
    return lines + ["answer:"]


def wait_for_route(address: str, timeout: float) -> list[str]:
    """Until the coordinator's plan is loaded on every stage it uses; its route."""
    deadline = time.monotonic() + timeout
    while True:
        status = ask_coordinator(address, "Status")
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
