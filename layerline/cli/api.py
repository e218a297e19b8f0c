"""`layerline api`: the OpenAI-compatible HTTP API and the dashboard over a cluster (layerline.api)."""

from __future__ import annotations

import argparse

from layerline.cli.common import add_route_args, rate, route_args, security_of, speculation
from layerline.errors import LayerlineError


def add_parsers(sub: argparse._SubParsersAction) -> dict:
    api = sub.add_parser(
        "api",
        help="serve an OpenAI-compatible HTTP API and the cluster dashboard",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (streaming as server-sent events) "
        "over the cluster, the dashboard on / and Prometheus metrics on /metrics. Prints a ready line with the URL.",
        epilog="example: layerline api --coordinator 10.0.0.1:7000 --host 0.0.0.0 --port 8000\n"
        "then: OPENAI_BASE_URL=http://10.0.0.1:8000/v1 OPENAI_API_KEY=none any OpenAI client",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_route_args(api)
    api.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    api.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    api.add_argument("--model-name", default="", help="the model's name in the API (default: the checkpoint's name)")
    api.add_argument(
        "--api-key-file",
        default="",
        help="file holding the key clients must send (Authorization: Bearer KEY); several keys: one per line",
    )
    api.add_argument(
        "--rate-limit",
        type=rate,
        default=None,
        metavar="N/s",
        help="requests per API key (the bearer token; without one, per caller address), e.g. 10/s or 600/min; "
        "past it 429 with Retry-After (default: none)",
    )
    api.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="seconds to wait at start for the cluster to have a working route, answering 503 meanwhile (300)",
    )
    api.add_argument(
        "--speculate",
        type=speculation,
        default=None,
        metavar="ngram|stage|smollm2|PATH",
        help="speculative decoding for every generation (greedy output unchanged): ngram = prompt lookup; stage = "
        "the draft model the first stage's host runs (layerline stage --draft); smollm2 "
        "or a model's path = a draft model with the same tokenizer, run by this server",
    )
    return {"api": cmd_api}


def cmd_api(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from layerline.api import serve_api
    from layerline.client import AsyncClient, ClientConfig
    from layerline.local_cluster import API_READY, die_with_parent

    die_with_parent()
    route = route_args(args)
    api_key = ""
    if args.api_key_file:
        try:
            with open(args.api_key_file) as f:
                api_key = f.read().strip()
        except OSError as e:
            raise LayerlineError(f"cannot read --api-key-file {args.api_key_file}: {e.strerror or e}") from None
        if not api_key:
            raise LayerlineError(f"--api-key-file {args.api_key_file} is empty")
    security = security_of(args)

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
            speculate=args.speculate or "",
            rate_limit=args.rate_limit,
            on_ready=ready,
            stop=stop,
        )

    asyncio.run(main())
    return 0
