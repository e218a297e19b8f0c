"""`layerline stage`: serve a range of a model's layers (given, or assigned by a coordinator). The stage's tunable
flags come from its settings table (`layerline.stage_server.settings`), where StageConfig takes its defaults: one
place for each flag's name, default and meaning."""

from __future__ import annotations

import argparse
import os
import sys

from layerline.cli.common import (
    add_security_args,
    add_weight_args,
    cpu_list,
    layer_range,
    positive,
    rate,
    security_of,
    size,
)
from layerline.errors import LayerlineError
from layerline.stage_server.settings import SETTINGS, Setting


def rate_text(text: str) -> str:
    if text:  # "" (the default) is no limit
        rate(text)  # a usage error unless N/s, N/min or N/h
    return text


_READERS = {"int": int, "positive": positive, "float": float, "bytes": size, "text": str, "rate": rate_text}


def _dest(s: Setting) -> str:
    return s.flag.lstrip("-").replace("-", "_")


def add_settings(p: argparse.ArgumentParser) -> None:
    """One flag per tunable stage setting, its default and its help from the settings table."""
    for s in SETTINGS:
        if s.kind == "switch":
            p.add_argument(s.flag, dest=_dest(s), action="store_true", help=s.help_text())
        else:
            p.add_argument(s.flag, dest=_dest(s), type=_READERS[s.kind], default=s.flag_default, help=s.help_text())


def settings_of(args: argparse.Namespace) -> dict[str, object]:
    """The StageConfig fields the tunable flags set, in the fields' units."""
    out: dict[str, object] = {}
    for s in SETTINGS:
        value = getattr(args, _dest(s))
        out[s.field] = value / s.scale if s.scale != 1.0 else value
    return out


def add_parsers(sub: argparse._SubParsersAction) -> dict:
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
    stage.add_argument("--layers", type=layer_range, help="the layer range A:B this stage serves")
    stage.add_argument(
        "--coordinator", default="", help="host:port of a coordinator: register there and serve the layers it assigns"
    )
    stage.add_argument("--max-memory", type=size, default=0, help="memory for weights + KV (default: free memory)")
    stage.add_argument("--remeasure", action="store_true", help="measure capacity again instead of using the cache")
    stage.add_argument(
        "--probe-links",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="with --coordinator: measure the links to the other stages this often, for the plan (10; 0: never)",
    )
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
    add_weight_args(stage)
    stage.add_argument(
        "--wire-dtype",
        choices=["float32", "bfloat16", "float16", "int8"],
        default="",
        help="dtype of the hidden states sent to the next stage (default: the stage's compute dtype given by "
        "--dtype bfloat16 or float16, else float32; quantized weights compute in float32; int8: a scale per token, "
        "a quarter of float32's bytes, for slow links)",
    )
    stage.add_argument(
        "--cpus",
        type=cpu_list,
        default=None,
        help="run on these CPU cores only, e.g. 2 or 0-3,8 (several stages on one host: a core or set each)",
    )
    add_settings(stage)
    add_security_args(stage)
    return {"stage": cmd_stage}


def fewer_malloc_arenas() -> None:
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


def wire_dtype_of(args: argparse.Namespace) -> str:
    """--wire-dtype, or the dtype the stage computes in when that is a 16-bit one (a bfloat16 stage's hidden states
    lose nothing on a bfloat16 wire and take half the bytes); quantized and float32 stages send float32."""
    return args.wire_dtype or (args.dtype if args.dtype in ("bfloat16", "float16") else "float32")


def cmd_stage(args: argparse.Namespace) -> int:
    import asyncio

    from layerline import wire
    from layerline.local_cluster import die_with_parent
    from layerline.model import FLOAT_DTYPES
    from layerline.model_source import DEFAULT_MODEL, resolve_model
    from layerline.stage_server.config import StageConfig
    from layerline.stage_server.server import print_ready, print_serving, serve

    die_with_parent()
    fewer_malloc_arenas()
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
    given = settings_of(args)
    # with --max-memory, the KV budget defaults to a quarter of it (it is part of what the stage gives)
    given["kv_cache_bytes"] = given["kv_cache_bytes"] or args.max_memory // 4
    try:
        config = StageConfig(
            model=resolve_model(model) if model is not None else "",  # "": fetched from the coordinator
            start=start,
            end=end,
            dtype=FLOAT_DTYPES[args.dtype] if args.dtype else None,
            quantize=args.quantize,
            wire_dtype=wire.WIRE_DTYPES[wire_dtype_of(args)],
            **given,
            security=security_of(args),
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
            probe_links=args.probe_links,
        )
    )
    return 0
