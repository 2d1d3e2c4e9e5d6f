"""The gateway's metrics and spans: what ``install`` adds to the app.

    GET /metrics on POLOS_METRICS_PORT (a listener of its own, not the API port)
      polos_gateway_requests_total{route,method,status}
      polos_gateway_request_duration_seconds{route}
      polos_gateway_confirms_in_flight          publishes awaiting the broker's confirm
      polos_gateway_publish_duration_seconds    publish to confirm (or failure)
      polos_gateway_event_streams               open GET .../events streams

``route`` is the route's template (``/api/v1/executions/{execution_id}``), never
the path, so the series count is bounded by the route table.

Spans (``otel`` extra and ``OTEL_EXPORTER_OTLP_ENDPOINT``): one ``submit`` span
per submit request, child of the caller's traceparent (the body's
``otel_traceparent``, else the ``traceparent`` header); the envelope then
carries the span's own traceparent, so the dispatcher's and worker's spans
hang below it. Without tracing the envelope carries the caller's value as it
came.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.context import APP_LINK, APP_WATCH
from gateway.settings import Settings
from observe import MetricsServer, Tracer, tracer_for, valid_traceparent
from observe.metrics import LATENCY_BUCKETS
from observe.tracing import Span


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "polos_gateway_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "polos_gateway_request_duration_seconds",
            "From the request's arrival to its answer (event streams: to their end)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.publish_latency = Histogram(
            "polos_gateway_publish_duration_seconds",
            "From a publish to the broker's confirm, or to its failure",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # (route, method, status) → the two children: labels() costs a lock and a
        # tuple hash per call, a dict hit costs neither.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class _LiveState(Collector):
    """What is read at scrape time: confirms in flight, open event streams."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        publisher = self._app[APP_LINK].publisher
        yield GaugeMetricFamily(
            "polos_gateway_confirms_in_flight",
            "Publishes awaiting the broker's confirm",
            value=publisher.in_flight if publisher is not None else 0,
        )
        yield GaugeMetricFamily(
            "polos_gateway_event_streams",
            "Open lifecycle event streams (GET /api/v1/executions/{id}/events)",
            value=self._app[APP_WATCH].streams,
        )


APP_METRICS = web.AppKey("metrics", GatewayMetrics)
APP_TRACER = web.AppKey("tracer", Tracer)
_SPAN = web.RequestKey("submit_span", Span)
UNMATCHED = "unmatched"


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def _middleware(metrics: GatewayMetrics | None) -> Any:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client left first (nginx's code for it)
            raise
        finally:
            if metrics is not None:
                metrics.answered(
                    _route(request), request.method, status, time.perf_counter() - started
                )
            span = request.get(_SPAN)
            if span is not None:
                span.end(**{"http.response.status_code": status})

    return observe


def submit_traceparent(request: web.Request, from_body: str | None) -> str | None:
    """The traceparent the envelope carries; with tracing, the ``submit`` span's own.

    The body's ``otel_traceparent`` (the Polos API field) wins over the header;
    a header that is not a valid W3C traceparent is ignored.
    """
    parent = from_body or valid_traceparent(request.headers.get("traceparent"))
    tracer = request.app.get(APP_TRACER)
    if tracer is None:
        return parent
    span = tracer.start(
        "submit",
        parent,
        {
            "http.route": _route(request),
            "polos.project_id": request.headers.get("X-Project-ID", ""),
        },
    )
    request[_SPAN] = span  # the middleware ends it with the answer's status
    return span.traceparent


def install(app: web.Application, settings: Settings) -> None:
    """Metrics (if POLOS_METRICS_PORT) and spans (if OTLP is configured) for this app."""
    observe = settings.observe
    metrics = GatewayMetrics() if observe.metrics_port else None
    tracer = tracer_for("polos-gateway")
    if metrics is None and tracer is None:
        return
    # Outermost: it sees the status error_middleware renders.
    app.middlewares.insert(0, _middleware(metrics))
    if tracer is not None:
        app[APP_TRACER] = tracer
    if metrics is not None:
        app[APP_METRICS] = metrics
        metrics.registry.register(_LiveState(app))
        app[APP_LINK].publish_observer = metrics.publish_latency.observe

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        server = None
        if metrics is not None:
            server = MetricsServer(
                metrics.registry, host=observe.metrics_host, port=observe.metrics_port
            )
            await server.start()
        yield
        if server is not None:
            await server.close()
        if tracer is not None:
            await tracer.flush()

    app.cleanup_ctx.append(lifetime)
