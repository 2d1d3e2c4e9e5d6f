"""What the workers saw: one line per execution started, read back after a phase.

A benchmark worker (ours, ``bench.e2e_worker``; the peer's Celery task,
``bench.peer``) appends ``<sent_at> <started_at> <execution_id>`` to a file of
its own for every execution it starts: ``sent_at`` is the wall-clock time the
load generator stamped into the request (``bench.loadgen.STAMP``), so
``started_at - sent_at`` is the submit-to-worker-start latency, measured from
the client's (intended) send time, queueing included. One ``write`` per line
(line-buffered): a few microseconds beside the milliseconds an execution costs.

``EventFollower`` is the other end: it follows the lifecycle events of one
queue on ``polos.events`` and notes when each execution's ``completed`` event
arrived, i.e. when a follower of the system (the execution store, a live
stream) learns the result.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from bench.stats import percentile
from schemas.topology import EVENTS_EXCHANGE

RECORDS_ENV = "BENCH_RECORDS"


class RecordWriter:
    """Worker side: one line per execution started (opened lazily: after a fork)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._file: IO[str] | None = None
        self._pid = 0

    def started(self, payload: Any, execution_id: str) -> None:
        started = time.time()
        if self._file is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._file = open(self._path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        sent = payload.get("sent_at", "nan") if isinstance(payload, dict) else "nan"
        self._file.write(f"{sent} {started:.6f} {execution_id}\n")


@dataclass(frozen=True, slots=True)
class Record:
    sent_at: float
    started_at: float
    execution_id: str


def read_records(paths: Iterable[Path]) -> list[Record]:
    out: list[Record] = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue  # a line being written
            try:
                out.append(Record(float(parts[0]), float(parts[1]), parts[2]))
            except ValueError:
                continue
    return out


def count_lines(paths: Iterable[Path]) -> int:
    total = 0
    for path in paths:
        try:
            total += path.read_bytes().count(b"\n")
        except OSError:
            continue
    return total


@dataclass(slots=True)
class LatencySummary:
    count: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    p999_ms: float = math.nan
    max_ms: float = math.nan

    @classmethod
    def of(cls, latencies_ms: list[float]) -> LatencySummary:
        values = sorted(latencies_ms)
        if not values:
            return cls()
        return cls(
            len(values),
            percentile(values, 50),
            percentile(values, 99),
            percentile(values, 99.9),
            values[-1],
        )


def started_in(records: Iterable[Record], start: float, end: float) -> list[Record]:
    return [r for r in records if start <= r.started_at < end]


@dataclass
class EventFollower:
    """The ``completed`` events of one queue of one project, with their arrival times."""

    project_id: str
    queue_name: str
    completed: dict[str, float] = field(default_factory=dict)
    _connection: AbstractConnection | None = None

    async def start(self, amqp_url: str) -> None:
        self._connection = await aio_pika.connect(
            amqp_url, client_properties={"connection_name": "bench-event-follower"}
        )
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        # Batches carry a project's events (schemas.dispatch.EventBatch): the queue is
        # picked out of each.
        await queue.bind(exchange, routing_key=f"{self.project_id}.#")
        await queue.consume(self._on_event, no_ack=True)

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        body = message.body
        if b'"status":"completed"' not in body:
            return
        arrived = time.time()
        data = orjson.loads(body)
        events = data.get("events", [data]) if isinstance(data, dict) else []
        for event in events:
            execution_id = event.get("execution_id") if isinstance(event, dict) else None
            if (
                isinstance(execution_id, str)
                and event.get("status") == "completed"
                and event.get("queue_name") == self.queue_name
            ):
                self.completed.setdefault(execution_id, arrived)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    def result_latencies_ms(
        self, records: Iterable[Record], start: float, end: float
    ) -> list[float]:
        """Submit-to-result of the executions whose ``completed`` arrived in [start, end)."""
        sent = {r.execution_id: r.sent_at for r in records}
        return [
            (at - sent[eid]) * 1000.0
            for eid, at in self.completed.items()
            if start <= at < end and eid in sent and not math.isnan(sent[eid])
        ]
