"""Running and asking a cluster: `coordinator` (the registry and planner), `status` and `plan` (what a
coordinator knows and would do), `drain` (take a stage out of service) and `certs` (TLS material for the hosts)."""

from __future__ import annotations

import argparse
import sys
import time

from layerline.cli.common import (
    add_metrics_args,
    add_model_args,
    add_security_args,
    add_weight_args,
    ask_coordinator,
    call_failed,
    json_of,
    positive,
    security_of,
    weight_format,
)
from layerline.errors import LayerlineError


def add_parsers(sub: argparse._SubParsersAction) -> dict:
    coord = sub.add_parser(
        "coordinator",
        help="run the coordinator: registry of stages and planner of their layer ranges",
        description="Serve the Coordinator service for one model: stages register with their measured capacity and "
        "heartbeat; it assigns contiguous layer ranges within each stage's memory (by default the fastest "
        "decoding of one session, weighing every hop's measured link: a model that fits one stage is served by one, "
        "the others become replicas) and answers clients' route requests. Stage hosts without the checkpoint fetch their layers from it.",
        epilog="example: layerline coordinator --model smollm2 --host 0.0.0.0 --port 7000",
    )
    add_model_args(coord)
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
    coord.add_argument(
        "--objective",
        choices=("latency", "throughput"),
        default="latency",
        help="what plans optimise: latency (default: one session's tokens/s, single stage first) or throughput "
        "(pipelined sessions: the slowest stage as fast as possible, every stage that helps in the chain)",
    )
    add_weight_args(coord)  # the weights' form for stages that fetch them and give none of their own
    add_metrics_args(coord)
    add_security_args(coord)

    for name, text in (
        ("status", "a table of the registered stages, their ranges, measured speed, memory and health"),
        ("plan", "what the coordinator would assign now, and why (dry run)"),
    ):
        p = sub.add_parser(name, help=text, epilog=f"example: layerline {name} --coordinator 10.0.0.1:7000")
        p.add_argument("--coordinator", required=True, help="host:port of the coordinator")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        add_security_args(p)

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
    add_security_args(drain)

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
    certs.add_argument("--days", type=positive, default=825, help="validity in days (825)")
    return {
        "coordinator": cmd_coordinator,
        "status": cmd_status,
        "plan": cmd_plan,
        "drain": cmd_drain,
        "certs": cmd_certs,
    }


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
            security=security_of(args),
            metrics_port=args.metrics_port,
            refine_s=args.refine,
            weights=weight_format(args),
            objective=args.objective,
        )
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The stages as a table when the terminal is wide enough, else one block of short lines per stage."""
    import shutil

    from layerline import status_view

    status = ask_coordinator(args.coordinator, "Status", security_of(args))
    if args.json:
        print(json_of(status))
        return 0
    views = [status_view.StageView.of(s) for s in status.stages]
    width = shutil.get_terminal_size((240, 24)).columns  # $COLUMNS, else the terminal's, else 240 (a pipe)
    lines = status_view.wrap(status_view.title(status), width)
    if views and status_view.table_width(views) <= width:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for heading, _, right in status_view.COLUMNS:
            table.add_column(heading, no_wrap=True, justify="right" if right else "left")
        for v in views:
            table.add_row(*(cell(v) for _, cell, _ in status_view.COLUMNS))
        print("\n".join(lines))
        Console(width=width, highlight=False, color_system="auto" if sys.stdout.isatty() else None).print(table)
        lines = []
    else:
        for v in views:
            lines += status_view.stage_block(v, width)
    for line in status_view.footer(status):
        lines += status_view.wrap(line, width)
    print("\n".join(lines))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = ask_coordinator(args.coordinator, "Plan", security_of(args))
    print(json_of(plan) if args.json else plan.explanation)
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    import grpc

    from layerline.v1 import stage_pb2, stage_pb2_grpc

    security = security_of(args)
    if not args.wait > 0:
        raise LayerlineError(f"--wait must be positive, got {args.wait}")
    with security.sync_channel(args.stage) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        try:
            reply = stub.Drain(stage_pb2.DrainRequest(wait_seconds=args.wait), timeout=10, metadata=security.metadata())
        except grpc.RpcError as e:
            raise call_failed(e, f"the stage at {args.stage}") from None
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
                print(f"the stage at {args.stage} no longer answers; its process exits once in-flight steps end")
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
