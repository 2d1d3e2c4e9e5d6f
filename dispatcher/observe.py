"""What the dispatcher shows of itself: counters fed by lifecycle events, gauges read
from its queue owners when scraped, and spans.

Nothing here sits inside the per-queue core. Every lifecycle transition goes
through ``Notifier.event``, which calls ``DispatcherObserver.event`` first;
each confirmed ledger record goes through ``DispatcherObserver.ledger_written``
(``Effector``); everything else (limits, slots held, queues owned) is read from
the session's owners at scrape time (``OwnersCollector``).

    polos_queue_transitions_total{project,queue,status}   admitted, running, completed,
                                                          failed, timed_out, cancelled,
                                                          deduplicated (at-least-once: a
                                                          takeover may repeat a terminal one)
    polos_queue_admission_latency_seconds{project,queue}  submission created → admitted
    polos_queue_ledger_records_total{project,queue,kind}  confirmed ledger records (record,
                                                          checkpoint): quorum enqueues of the
                                                          owner's own, beside the executions'
    polos_queue_ledger_bytes_total{project,queue}
    polos_queue_config_wait_timeouts_total{project,queue}  submissions admitted without the
                                                          registry event they name (after
                                                          POLOS_DISPATCHER_CONFIG_WAIT_SECONDS)
    polos_queue_concurrency_limit{project,queue}          owned queues; +Inf = unlimited
    polos_queue_holding{project,queue}                    executions holding a slot
    polos_dispatcher_queues{state=owned|standby}
    polos_dispatcher_sessions_total, polos_dispatcher_takeovers_total, polos_dispatcher_ready

(project, queue) labels are bounded by POLOS_METRICS_MAX_QUEUES and
POLOS_METRICS_QUEUES (``observe.QueueLabels``); the rest is ``~other``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from observe import OTHER, ObserveSettings, QueueLabels, tracer_for
from observe.metrics import DURATION_BUCKETS
from schemas.dispatch import TERMINAL_STATUSES, ExecutionStatus
from schemas.envelope import SubmissionEnvelope
from schemas.ids import unix_seconds

if TYPE_CHECKING:
    from dispatcher.owner import QueueOwner
    from dispatcher.session import Session
    from dispatcher.settings import Settings

log = logging.getLogger(__name__)

QueueKey = tuple[str, str]
MAX_CACHED_CHILDREN = 10_000
# Spans of admission and dispatch need the admission time until the run starts.
MAX_TRACKED_ADMISSIONS = 100_000


class Observed(Protocol):
    """What the watchers read of the dispatcher (``dispatcher.service.Dispatcher``)."""

    settings: Settings
    ready: asyncio.Event
    sessions: int

    @property
    def session(self) -> Session | None: ...


def waiting(owner: QueueOwner) -> int:
    """Submissions the owner holds in its prefetch, not admitted yet."""
    return owner.pending


def owning(owner: QueueOwner) -> bool:
    """Whether this dispatcher owns the queue (single active consumer chose it)."""
    return owner.owning


class DispatcherObserver:
    def __init__(self, settings: ObserveSettings) -> None:
        self.registry = CollectorRegistry()
        self.labels = QueueLabels(settings)
        self.transitions = Counter(
            "polos_queue_transitions",
            "Lifecycle transitions this dispatcher announced, by queue and status",
            ["project", "queue", "status"],
            registry=self.registry,
        )
        self.admission_latency = Histogram(
            "polos_queue_admission_latency_seconds",
            "From the submission's creation (gateway) to its admission",
            ["project", "queue"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        # The ledger's share of the broker's work (docs/architecture.md, Dispatcher):
        # below saturation about one record per flush per queue.
        self.ledger_records = Counter(
            "polos_queue_ledger_records",
            "Ledger records the broker confirmed, by queue and kind (record, checkpoint)",
            ["project", "queue", "kind"],
            registry=self.registry,
        )
        self.ledger_bytes = Counter(
            "polos_queue_ledger_bytes",
            "Bytes of the ledger records the broker confirmed, by queue",
            ["project", "queue"],
            registry=self.registry,
        )
        self._ledger_children: dict[tuple[str, str, bool], tuple[Any, Any]] = {}
        # A registry reader far behind, or events lost: an operator's alert.
        self.config_wait_timeouts = Counter(
            "polos_queue_config_wait_timeouts",
            "Submissions admitted without the registry event naming their limit or strategy "
            "(they waited POLOS_DISPATCHER_CONFIG_WAIT_SECONDS for it)",
            ["project", "queue"],
            registry=self.registry,
        )
        self.takeovers = 0  # counted by the status sampler (dispatcher/status.py)
        # Per queue, transitions by status: the operator page's rates.
        self.counts: defaultdict[QueueKey, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self._children: dict[tuple[str, str, ExecutionStatus], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}  # admission_latency's, the same way
        self.tracer = tracer_for("polos-dispatcher")
        self._admitted_at: dict[str, float] = {}

    def event(self, status: ExecutionStatus, envelope: SubmissionEnvelope) -> None:
        """One lifecycle transition (``Notifier.event`` calls this first); never raises."""
        try:
            self._count(status, envelope)
        except Exception:
            # Watching must never keep a transition from being announced.
            log.exception("observing %s of %s failed", status, envelope.execution_id)

    def ledger_written(self, project_id: str, queue_name: str, checkpoint: bool, size: int) -> None:
        """One ledger record confirmed (``Effector``); never raises."""
        try:
            key = (project_id, queue_name, checkpoint)
            children = self._ledger_children.get(key)
            if children is None:
                if len(self._ledger_children) >= MAX_CACHED_CHILDREN:
                    self._ledger_children.clear()
                label = self.labels(project_id, queue_name)
                children = self._ledger_children[key] = (
                    self.ledger_records.labels(*label, "checkpoint" if checkpoint else "record"),
                    self.ledger_bytes.labels(*label),
                )
            records, size_bytes = children
            records.inc()
            size_bytes.inc(size)
        except Exception:
            log.exception("observing a ledger record of %s/%s failed", project_id, queue_name)

    def config_timed_out(self, project_id: str, queue_name: str, count: int) -> None:
        """Submissions admitted without their registry event (rare: no cache); never raises."""
        try:
            self.config_wait_timeouts.labels(*self.labels(project_id, queue_name)).inc(count)
        except Exception:
            log.exception("observing a config wait of %s/%s failed", project_id, queue_name)

    def _count(self, status: ExecutionStatus, envelope: SubmissionEnvelope) -> None:
        project_id, queue_name = envelope.project_id, envelope.queue_name
        self.counts[(project_id, queue_name)][status.value] += 1
        key = (project_id, queue_name, status)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= MAX_CACHED_CHILDREN:
                self._children.clear()  # a lookup cache over raw names: bounded
            child = self._children[key] = self.transitions.labels(
                *self.labels(project_id, queue_name), status.value
            )
        child.inc()
        if status is ExecutionStatus.ADMITTED:
            created = unix_seconds(envelope.created_at)
            now = time.time()
            if created is not None:
                latency = self._latencies.get(key[:2])
                if latency is None:
                    if len(self._latencies) >= MAX_CACHED_CHILDREN:
                        self._latencies.clear()
                    latency = self._latencies[key[:2]] = self.admission_latency.labels(
                        *self.labels(project_id, queue_name)
                    )
                latency.observe(max(0.0, now - created))
            if self.tracer is not None:
                self._trace_admission(envelope, created, now)
        elif self.tracer is not None:
            self._trace(status, envelope)

    def _trace_admission(
        self, envelope: SubmissionEnvelope, created: float | None, now: float
    ) -> None:
        assert self.tracer is not None
        self.tracer.record(
            "admission",
            envelope.otel_traceparent,
            created if created is not None else now,
            now,
            _attributes(envelope),
        )
        if len(self._admitted_at) >= MAX_TRACKED_ADMISSIONS:
            del self._admitted_at[next(iter(self._admitted_at))]
        self._admitted_at[envelope.execution_id] = now

    def _trace(self, status: ExecutionStatus, envelope: SubmissionEnvelope) -> None:
        assert self.tracer is not None
        if status is ExecutionStatus.RUNNING:
            admitted = self._admitted_at.pop(envelope.execution_id, None)
            if admitted is not None:
                self.tracer.record(
                    "dispatch", envelope.otel_traceparent, admitted, None, _attributes(envelope)
                )
        elif status in TERMINAL_STATUSES:
            # A run that ended before a worker reported it (no running event): its
            # dispatch lasted until the dispatcher heard back.
            admitted = self._admitted_at.pop(envelope.execution_id, None)
            if admitted is not None and status is not ExecutionStatus.DEDUPLICATED:
                self.tracer.record(
                    "dispatch", envelope.otel_traceparent, admitted, None, _attributes(envelope)
                )

    async def close(self) -> None:
        if self.tracer is not None:
            await self.tracer.flush()


def _attributes(envelope: SubmissionEnvelope) -> dict[str, str]:
    return {
        "polos.execution_id": envelope.execution_id,
        "polos.project": envelope.project_id,
        "polos.queue": envelope.queue_name,
        "polos.workflow": envelope.workflow_id,
    }


class OwnersCollector(Collector):
    """Gauges read from the current session's owners at scrape time."""

    def __init__(self, dispatcher: Observed, observer: DispatcherObserver) -> None:
        self._dispatcher = dispatcher
        self._observer = observer

    def collect(self) -> Iterator[Metric]:
        labels = self._observer.labels
        limit = GaugeMetricFamily(
            "polos_queue_concurrency_limit",
            "Concurrency limit of each owned queue (+Inf: unlimited)",
            labels=["project", "queue"],
        )
        holding = GaugeMetricFamily(
            "polos_queue_holding",
            "Executions holding a slot of each owned queue",
            labels=["project", "queue"],
        )
        held_by_label: defaultdict[tuple[str, str], int] = defaultdict(int)
        owned = standby = 0
        session = self._dispatcher.session
        for (project_id, queue_name), owner in list(session.owners.items()) if session else ():
            if not owning(owner):
                standby += 1
                continue
            owned += 1
            label = labels(project_id, queue_name)
            held_by_label[label] += owner.held
            if label[0] != OTHER:  # a sum of limits means nothing
                value = owner.limit
                limit.add_metric(list(label), math.inf if value is None else float(value))
        for label, held in held_by_label.items():
            holding.add_metric(list(label), held)
        yield limit
        yield holding
        queues = GaugeMetricFamily(
            "polos_dispatcher_queues",
            "Queues this dispatcher consumes, as their owner or as a standby",
            labels=["state"],
        )
        queues.add_metric(["owned"], owned)
        queues.add_metric(["standby"], standby)
        yield queues
        yield CounterMetricFamily(
            "polos_dispatcher_sessions",
            "Sessions started (the first, then one per lost connection)",
            value=self._dispatcher.sessions,
        )
        yield CounterMetricFamily(
            "polos_dispatcher_takeovers",
            "Queues this dispatcher began to own after standing by for them",
            value=self._observer.takeovers,
        )
        yield GaugeMetricFamily(
            "polos_dispatcher_ready",
            "1 while a session is up",
            value=1 if self._dispatcher.ready.is_set() else 0,
        )
