"""W3C trace context, and OpenTelemetry spans where they are wanted.

A ``traceparent`` (W3C Trace Context) travels from the submit request (its
header, or the body's ``otel_traceparent``, which the Polos API carries) in
the envelope to the worker, where handlers read it as ``ctx.traceparent``.

Spans exist only when the ``otel`` extra is installed *and*
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (the standard OpenTelemetry variables
configure the exporter). Otherwise ``tracer_for`` returns ``None`` and the
callers skip every tracing call: not one OpenTelemetry module is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# version-traceid-parentid-flags, lowercase hex; "ff" is not a valid version.
_TRACEPARENT_RE = re.compile(
    r"^(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$"
)

Attributes = Mapping[str, str | int | float | bool]


def valid_traceparent(value: str | None) -> str | None:
    """``value`` if it is a well-formed W3C traceparent, else ``None`` (ignored, as the
    W3C spec asks of a header that does not parse)."""
    if value is None:
        return None
    value = value.strip()
    return value if _TRACEPARENT_RE.fullmatch(value) else None


class Tracer:
    """Spans of one service, exported over OTLP/HTTP (``otel`` extra)."""

    def __init__(self, service_name: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        # A provider of our own (not the global one): several services may share
        # a process in tests, and an application's own provider stays its own.
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._tracer = self.provider.get_tracer("polos")
        self._propagator = TraceContextTextMapPropagator()

    def _parent(self, traceparent: str | None) -> Any:
        valid = valid_traceparent(traceparent)
        return self._propagator.extract({"traceparent": valid}) if valid else None

    def start(self, name: str, traceparent: str | None, attributes: Attributes) -> Span:
        """A span starting now, child of ``traceparent`` when there is a valid one."""
        span = self._tracer.start_span(
            name, context=self._parent(traceparent), attributes=dict(attributes)
        )
        return Span(span, self._propagator)

    def record(
        self,
        name: str,
        traceparent: str | None,
        start: float,
        end: float | None = None,
        attributes: Attributes | None = None,
    ) -> None:
        """A span that happened already: from ``start`` to ``end`` (Unix seconds, now)."""
        span = self._tracer.start_span(
            name,
            context=self._parent(traceparent),
            attributes=dict(attributes or {}),
            start_time=int(start * 1e9),
        )
        span.end(end_time=int((end if end is not None else time.time()) * 1e9))

    async def flush(self) -> None:
        """Export what is buffered now (the provider shuts down by itself at exit).

        In a thread: the export is a blocking HTTP request, which must not hold
        the loop (in tests the collector may be served by that very loop).
        """
        await asyncio.to_thread(self.provider.force_flush, 5000)


class Span:
    def __init__(self, span: Any, propagator: Any) -> None:
        self.span = span
        self._propagator = propagator

    @property
    def traceparent(self) -> str | None:
        """This span as the parent of what follows (what goes into the envelope)."""
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier.get("traceparent")

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """This span is the current one inside the block (spans made there nest below it)."""
        from opentelemetry import trace

        with trace.use_span(self.span, end_on_exit=False):
            yield

    def end(self, error: BaseException | None = None, **attributes: str | int) -> None:
        from opentelemetry.trace import Status, StatusCode

        for key, value in attributes.items():
            self.span.set_attribute(key, value)
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self.span.end()


def tracer_for(service_name: str) -> Tracer | None:
    """The process's tracer, or ``None`` when spans are not wanted or cannot be made."""
    if not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return None
    try:
        return Tracer(service_name)
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not installed "
            "(pip install 'polos-gateway[otel]'): no spans"
        )
        return None
