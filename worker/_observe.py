"""What a worker shows of itself: handler metrics, spans, and the log context.

Every workflow handler is wrapped once, when the worker starts (``Worker.start``);
nothing inside the consumer changes. The wrapper runs inside the handler's own
task, so the log context it binds (execution id, project, queue, workflow)
belongs to that run alone.

    polos_worker_running                              executions this process holds
    polos_worker_concurrency                          its POLOS_WORKER_CONCURRENCY
    polos_worker_executions_total{workflow,outcome}   completed | failed | cancelled |
                                                      timed_out (a hand-back on shutdown
                                                      counts as cancelled)
    polos_worker_handler_duration_seconds{workflow}
    polos_worker_start_latency_seconds{workflow}      from the submission's creation (the
                                                      gateway's clock) to its first run's
                                                      start here; retries and redeliveries
                                                      are not counted

``workflow`` is bounded by the workflows the code registers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from observe import MetricsServer, ObserveSettings, bind, tracer_for
from observe.metrics import DURATION_BUCKETS
from schemas.ids import unix_seconds
from worker._context import ExecutionContext
from worker._delivery import Handler

# Start latency is milliseconds when the queues keep up, minutes when they do not.
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0)

# The deadline's timer and the wall clock may differ by a hair.
DEADLINE_SLACK_SECONDS = 0.05


class _Running(Collector):
    def __init__(self, running: Callable[[], int], concurrency: int) -> None:
        self._running = running
        self._concurrency = concurrency

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "polos_worker_running", "Executions this worker holds", value=self._running()
        )
        yield GaugeMetricFamily(
            "polos_worker_concurrency", "Executions it runs at once", value=self._concurrency
        )


class WorkerObserver:
    def __init__(
        self, settings: ObserveSettings, *, running: Callable[[], int], concurrency: int
    ) -> None:
        self._settings = settings
        self.registry = CollectorRegistry()
        self.executions = Counter(
            "polos_worker_executions",
            "Handler runs that ended, by workflow and outcome",
            ["workflow", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "polos_worker_handler_duration_seconds",
            "How long handlers ran",
            ["workflow"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.start_latency = Histogram(
            "polos_worker_start_latency_seconds",
            "From a submission's creation (gateway) to its first run's start on this worker",
            ["workflow"],
            buckets=START_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Running(running, concurrency))
        self.tracer = tracer_for("polos-worker")
        self._server: MetricsServer | None = None

    def wrap(self, workflow_id: str, handler: Handler) -> Handler:
        executions, duration, tracer = self.executions, self.duration, self.tracer
        observe = duration.labels(workflow_id).observe
        waited = self.start_latency.labels(workflow_id).observe
        # The counters of each outcome, looked up once instead of per run.
        ended = {
            outcome: executions.labels(workflow_id, outcome).inc
            for outcome in ("completed", "failed", "cancelled", "timed_out")
        }

        async def observed(ctx: ExecutionContext, payload: Any) -> Any:
            bind(
                execution_id=ctx.execution_id,
                project_id=ctx.project_id,
                queue_name=ctx.queue_name,
                workflow_id=ctx.workflow_id,
            )
            span = None
            if tracer is not None:
                span = tracer.start(
                    f"run {workflow_id}",
                    ctx.traceparent,
                    {
                        "polos.execution_id": ctx.execution_id,
                        "polos.project": ctx.project_id,
                        "polos.queue": ctx.queue_name,
                        "polos.workflow": workflow_id,
                        "polos.worker_id": ctx.worker_id,
                    },
                )
            if not ctx.retry_count and not ctx.redelivered:
                created = unix_seconds(ctx.submission.created_at)
                if created is not None:
                    waited(max(0.0, time.time() - created))
            started = time.perf_counter()
            outcome, error = "failed", None
            try:
                with span.current() if span is not None else contextlib.nullcontext():
                    result = await handler(ctx, payload)
                outcome = "completed"
                return result
            except asyncio.CancelledError:
                late = ctx.remaining_seconds <= DEADLINE_SLACK_SECONDS
                outcome = "timed_out" if late else "cancelled"
                raise
            except BaseException as exc:
                error = exc
                raise
            finally:
                observe(time.perf_counter() - started)
                ended[outcome]()
                if span is not None:
                    span.end(error, **{"polos.outcome": outcome})

        return observed

    async def start(self) -> None:
        if self._settings.metrics_port and self._server is None:
            server = MetricsServer(
                self.registry, host=self._settings.metrics_host, port=self._settings.metrics_port
            )
            await server.start()
            self._server = server

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None
        if self.tracer is not None:
            await self.tracer.flush()
