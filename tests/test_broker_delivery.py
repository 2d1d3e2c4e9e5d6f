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


async def test_an_immediate_consumer_through_an_aio_pika_queue_gets_aiormqs_messages_in_one_task(
    connection: AbstractConnection,
) -> None:
    bodies = [str(n).encode() for n in range(200)]
    name, _ = await _queue_with(connection, bodies)
    channel = await connection.channel()
    queue = await channel.declare_queue(name, passive=True)
    got: list[bytes] = []
    tasks: set[asyncio.Task[object] | None] = set()
    done = asyncio.Event()

    @immediate
    def on_message(message: DeliveredMessage) -> None:
        assert isinstance(message, DeliveredMessage)  # not aio-pika's IncomingMessage
        got.append(message.body)
        tasks.add(asyncio.current_task())
        if len(got) == len(bodies):
            done.set()

    # aio-pika wraps it (its queue consumer: an IncomingMessage and a task more).
    await queue.consume(on_message, no_ack=True)
    await asyncio.wait_for(done.wait(), 10)
    assert got == bodies
    assert len(tasks) == 1


async def test_an_immediate_callback_run_by_aio_pika_gets_the_same_message_rebuilt(
    connection: AbstractConnection,
) -> None:
    # What it gets if broker.delivery is not installed: aio-pika's message, made
    # back into aiormq's.
    name, _ = await _queue_with(connection, [])
    channel = await connection.channel()
    await channel.default_exchange.publish(
        aio_pika.Message(b"x", message_id="m-1", headers={"h": 1}), routing_key=name
    )
    queue = await channel.declare_queue(name, passive=True)
    incoming = await queue.get(timeout=5)
    assert incoming is not None
    got: list[DeliveredMessage] = []

    @immediate
    def on_message(message: DeliveredMessage) -> None:
        got.append(message)

    await on_message(incoming)
    [message] = got
    assert (message.body, message.delivery_tag, message.redelivered) == (
        b"x",
        incoming.delivery_tag,
        False,
    )
    assert message.header.properties.message_id == "m-1"
    assert message.header.properties.headers == {"h": 1}
    assert message.channel is await channel.get_underlay_channel()
