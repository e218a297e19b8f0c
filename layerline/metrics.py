"""Prometheus metrics for the stage servers and the coordinator (`--metrics-port`), in a registry of their own.

What is counted on the hot path anyway (steps, token positions, tokens sampled, compute seconds) is read when
Prometheus scrapes (`Snapshot` collectors): nothing extra per token. Per call: a histogram of each forward pass's
compute time, and an interceptor that counts every RPC by method and the status it ended with (errors by code).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import grpc
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from layerline.errors import LayerlineError

logger = logging.getLogger(__name__)


class Snapshot(Collector):
    """Metrics read from live objects at scrape time: `read()` returns (name, help, kind, value, labels) tuples, kind
    "counter" or "gauge"."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, str, float, dict[str, str]]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for name, text, kind, value, labels in self.read():
            family = families.get(name)
            if family is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[name] = cls(name, text, labels=list(labels))
            family.add_metric(list(labels.values()), value)
        return list(families.values())


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts every call of the server's services by method and final status code (`..._rpcs_total`)."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.calls = Counter(
            f"{prefix}_rpcs", "RPCs answered, by method and status code", ["method", "code"], registry=registry
        )

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        counter = self.calls

        def record(context: grpc.aio.ServicerContext, failed: bool) -> None:
            code = context.code()
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            counter.labels(method, name).inc()

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    result = await inner(request, context)
                except BaseException:
                    record(context, True)
                    raise
                record(context, False)
                return result

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException:
                    record(context, True)
                    raise
                record(context, False)

            return handler._replace(unary_stream=unary_stream)
        return handler  # streams in: Push is counted by the stage itself, per step


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> str:
    """Serve /metrics for `registry` on host:port (0: any free port) from a thread; returns host:port."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise LayerlineError(f"cannot serve metrics on {host}:{port}: {e.strerror or e} (port taken?)") from None
    address = f"{host}:{server.server_port}"
    logger.info("Prometheus metrics on http://%s/metrics", address)
    return address


def uptime(started: float) -> tuple[str, str, str, float, dict[str, str]]:
    return (
        "layerline_uptime_seconds",
        "seconds since the process started serving",
        "gauge",
        time.monotonic() - started,
        {},
    )
