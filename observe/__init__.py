"""What every process shares for being watched: logs, metrics, traces.

settings.py  ObserveSettings (POLOS_LOG_*, POLOS_METRICS_*) and the bounded queue labels
logs.py      setup_logging(): text or JSON lines, with the execution's ids where known
metrics.py   MetricsServer: GET /metrics on POLOS_METRICS_PORT, in the process's loop
tracing.py   W3C traceparent checks; OpenTelemetry spans with the otel extra
"""

from observe.logs import bind, log_context, setup_logging
from observe.metrics import MetricsServer
from observe.settings import OTHER, ObserveSettings, QueueLabels
from observe.tracing import Tracer, tracer_for, valid_traceparent

__all__ = [
    "OTHER",
    "MetricsServer",
    "ObserveSettings",
    "QueueLabels",
    "Tracer",
    "bind",
    "log_context",
    "setup_logging",
    "tracer_for",
    "valid_traceparent",
]
