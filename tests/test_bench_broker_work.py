"""The benchmark's broker accounting reads what the broker did: N publishes into a quorum
queue are N enqueues, a BCC copy is one more, and deliveries and acks are counted apart."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from yarl import URL

from bench import broker_work
from schemas.topology import results_queue, submit_queue

pytestmark = pytest.mark.asyncio

N = 250


def _vhost(amqp_url: str) -> str:
    return URL(amqp_url).path.lstrip("/") or "/"


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs a local rabbitmqctl")
async def test_enqueues_deliveries_and_acks_are_the_known_counts(
    amqp_url: str, amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    submit, results = submit_queue(uid, "q"), results_queue(uid, "q")
    publisher = await amqp.channel(publisher_confirms=True)
    for name in (submit, results):
        delete_queues(name)
        await publisher.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    consumer = await amqp.channel()
    await consumer.set_qos(prefetch_count=2 * N)
    received: list[AbstractIncomingMessage] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        received.append(message)

    await (await consumer.get_queue(submit)).consume(on_message)
    before = await broker_work.read_async(_vhost(amqp_url))
    assert before is not None

    # N plain publishes, then N more each with a BCC copy into the results queue.
    exchange = publisher.default_exchange
    await asyncio.gather(*(exchange.publish(aio_pika.Message(b"x"), submit) for _ in range(N)))
    await asyncio.gather(
        *(
            exchange.publish(aio_pika.Message(b"x", headers={"BCC": [results]}), submit)
            for _ in range(N)
        )
    )
    async with asyncio.timeout(10):
        while len(received) < 2 * N:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    for message in received[:N]:
        await message.ack()
    await asyncio.sleep(0.2)  # the settlements reach the queue's state machine
    after = await broker_work.read_async(_vhost(amqp_url))
    assert after is not None

    work = broker_work.work_between(before, after)
    assert work.enqueues == {"submit": 2 * N, "results": N}
    assert work.deliveries == {"submit": 2 * N}
    assert work.acks == {"submit": N}
    assert work.gone == 0
    per = work.per(N)
    assert per["enqueues"] == 3.0
    assert per["enqueues_by_queue"] == {"results": 1.0, "submit": 2.0}
    assert per["deliveries"] == 2.0
    assert per["acks"] == 1.0
