"""The recorder's metrics, read from its stats when scraped.

polos_recorder_events_received_total      deliveries taken from polos.recorder
polos_recorder_events_written_total       events written to the store
polos_recorder_events_dead_lettered_total
polos_recorder_write_failures_total       attempts that found the store away
polos_recorder_pending                    received, not yet settled
polos_recorder_backlog                    events waiting in polos.recorder (broker)
polos_recorder_lag_seconds                the newest event written: from its
                                          transition to its write
polos_recorder_store_available            0 while Redis is away
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from recorder.service import Recorder
from schemas.ids import unix_seconds


class RecorderCollector(Collector):
    def __init__(self, recorder: Callable[[], Recorder | None]) -> None:
        self._recorder = recorder
        self.backlog: int | None = None

    async def refresh(self) -> None:
        recorder = self._recorder()
        self.backlog = await recorder.backlog() if recorder is not None else None

    def collect(self) -> Iterator[Metric]:
        recorder = self._recorder()
        if recorder is None:
            return
        stats = recorder.stats
        for name, text, value in (
            ("events_received", "Deliveries taken from the recorders' queue", stats.received),
            ("events_written", "Events written to the execution store", stats.recorded),
            ("events_dead_lettered", "Events kept in polos.dead instead", stats.dead_lettered),
            ("write_failures", "Write attempts that found the store away", stats.write_failures),
        ):
            yield CounterMetricFamily(f"polos_recorder_{name}", text, value=value)
        yield GaugeMetricFamily(
            "polos_recorder_pending", "Received, not yet settled", value=recorder.pending
        )
        if self.backlog is not None:
            yield GaugeMetricFamily(
                "polos_recorder_backlog",
                "Events waiting in the recorders' queue (the broker's count)",
                value=self.backlog,
            )
        lag = 0.0
        at = unix_seconds(stats.last_event_at) if stats.last_event_at is not None else None
        if at is not None:
            lag = max(0.0, stats.last_written - at)
        yield GaugeMetricFamily(
            "polos_recorder_lag_seconds",
            "The newest event written: from its transition to its write to the store",
            value=lag,
        )
        yield GaugeMetricFamily(
            "polos_recorder_store_available",
            "0 while the execution store is away",
            value=1 if recorder.store_available else 0,
        )


def recorder_registry(collector: RecorderCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry
