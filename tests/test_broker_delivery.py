"""``broker.delivery``: consumers called without a task per delivery, against the broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage

from broker.connection import Nodes, connect
from broker.delivery import immediate


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    connection = await connect(Nodes((amqp_url,)), "test")
    yield connection
    await connection.close()


async def _queue_with(connection: AbstractConnection, bodies: list[bytes]) -> tuple[str, object]:
    channel = await connection.channel()
    queue = await channel.declare_queue("", exclusive=True)
    for body in bodies:
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
    return queue.name, channel


async def test_an_immediate_consumer_gets_every_delivery_in_order_in_one_task(
    connection: AbstractConnection,
) -> None:
    bodies = [str(n).encode() for n in range(200)]
    name, _ = await _queue_with(connection, bodies)
    channel = await connection.channel()
    underlay = await channel.get_underlay_channel()
    got: list[bytes] = []
    tasks: set[asyncio.Task[object] | None] = set()
    done = asyncio.Event()

    @immediate
    def on_message(message: DeliveredMessage) -> None:
        got.append(message.body)
        tasks.add(asyncio.current_task())
        if len(got) == len(bodies):
            done.set()

    await underlay.basic_consume(name, on_message, no_ack=True)
    await asyncio.wait_for(done.wait(), 10)
    assert got == bodies
    # aiormq's way is a task per delivery: 200 tasks. Here: the channel's reader.
    assert len(tasks) == 1


async def test_a_failing_immediate_consumer_does_not_stop_the_channel(
    connection: AbstractConnection, caplog: pytest.LogCaptureFixture
) -> None:
    name, _ = await _queue_with(connection, [b"boom", b"ok"])
    channel = await connection.channel()
    underlay = await channel.get_underlay_channel()
    got: list[bytes] = []

    @immediate
    def on_message(message: DeliveredMessage) -> None:
        if message.body == b"boom":
            raise RuntimeError("boom")
        got.append(message.body)

    await underlay.basic_consume(name, on_message, no_ack=True)
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.05)
    assert got == [b"ok"]
    assert "failed on a delivery" in caplog.text
    assert not underlay.is_closed


async def test_other_consumers_run_as_aiormq_runs_them(connection: AbstractConnection) -> None:
    name, _ = await _queue_with(connection, [b"a", b"b"])
    channel = await connection.channel()
    underlay = await channel.get_underlay_channel()
    got: list[bytes] = []
    tasks: set[asyncio.Task[object] | None] = set()

    async def on_message(message: DeliveredMessage) -> None:
        await asyncio.sleep(0)  # a coroutine consumer may await
        got.append(message.body)
        tasks.add(asyncio.current_task())

    await underlay.basic_consume(name, on_message, no_ack=True)
    for _ in range(100):
        if len(got) == 2:
            break
        await asyncio.sleep(0.05)
    assert got == [b"a", b"b"]
    assert len(tasks) == 2  # a task each
    assert isinstance(underlay, aiormq.Channel)
