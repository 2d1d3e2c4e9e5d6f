"""The limit: a bare aio-pika loop publishing with confirms, many in flight.

What the gateway could at best do per process if HTTP cost nothing: persistent
messages of the gateway's envelope size, ``mandatory``, to a quorum queue
declared with the submission queues' arguments, on one channel with publisher
confirms, ``inflight`` publishes outstanding at any time (as many as the
gateway has requests in flight with that many connections). Written as a user
of aio-pika would write it: ``exchange.publish(Message(...))`` in a loop per
task.

With ``client="broker.publisher"`` the same loop goes through our own
``broker.publisher.ConfirmedPublisher`` (one channel) instead: what the
gateway's publishing costs without HTTP, the limit of our own stack.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import aio_pika

from bench.harness import PerfWindow, run_child, ticking, wait_for_window
from bench.stats import WorkerReport
from broker.publisher import ConfirmedPublisher
from schemas.topology import submit_queue_arguments


@dataclass(frozen=True, slots=True)
class PublishSpec:
    amqp_url: str
    queue: str
    body: bytes
    inflight: int
    queue_max_length: int = 1_000_000
    client: str = "aio-pika"  # or "broker.publisher"


Publish = Callable[[str], Awaitable[object]]
"""Publish the bench message with this message id and wait for its confirm."""


def _aio_pika(exchange: aio_pika.abc.AbstractExchange, spec: PublishSpec) -> Publish:
    def publish(message_id: str) -> Awaitable[object]:
        message = aio_pika.Message(
            spec.body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
        )
        return exchange.publish(message, routing_key=spec.queue, mandatory=True)

    return publish


def _ours(publisher: ConfirmedPublisher, spec: PublishSpec) -> Publish:
    def publish(message_id: str) -> Awaitable[object]:
        return publisher.publish(spec.queue, spec.body, message_id=message_id)

    return publish


async def _drive(
    publish: Publish, window: PerfWindow, report: WorkerReport, task_index: int
) -> None:
    perf = time.perf_counter
    start, end = window.start, window.end
    latencies = report.latencies_ms
    n = 0
    while True:
        sent = perf()
        if sent >= end:
            return
        n += 1
        try:
            await publish(f"{task_index}-{n}")
        except Exception as exc:
            if sent >= start:
                report.error(exc)
            continue
        done = perf()
        if start <= done < end:
            report.ok += 1
            latencies.append((done - sent) * 1000.0)


async def _run(spec: PublishSpec, conn: Connection) -> WorkerReport:
    connection = await aio_pika.connect(
        spec.amqp_url, client_properties={"connection_name": "bench-bare-publish"}
    )
    report = WorkerReport()
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.declare_queue(
            spec.queue,
            durable=True,
            arguments=submit_queue_arguments(max_length=spec.queue_max_length),
        )
        publisher: ConfirmedPublisher | None = None
        if spec.client == "broker.publisher":
            publisher = ConfirmedPublisher(connection, confirm_timeout=10.0, channels=1)
            await publisher.start()
            publish = _ours(publisher, spec)
        else:
            publish = _aio_pika(channel.default_exchange, spec)
        window = await wait_for_window(conn)
        async with ticking(conn, report):
            await asyncio.gather(
                *(_drive(publish, window, report, i) for i in range(spec.inflight))
            )
        if publisher is not None:
            await publisher.close()
        report.statuses = {200: report.ok}
    finally:
        await connection.close()
    return report


def publish_process(spec: PublishSpec, conn: Connection) -> None:
    """Entry point of the bare publish process (``bench.harness.run_processes`` target)."""
    run_child(conn, _run(spec, conn))
