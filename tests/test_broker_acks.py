"""broker.acks: a channel's acknowledgements written together, as the broker reads them.

The frames are checked byte for byte against pamqp's; what the broker does with
them (settled, requeued, nothing redelivered, nothing lost at a close) against
the real broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from aiormq import spec
from aiormq.abc import ChannelFrame, DeliveredMessage

from broker.acks import ack_frame, acks_of, nack_frame

TAGS = (1, 2, 255, 256, 2**32 + 5, 2**63 - 1)


@pytest.mark.parametrize("channel", [1, 7, 65535])
@pytest.mark.parametrize("tag", TAGS)
def test_frames_are_pamqps(channel: int, tag: int) -> None:
    def pamqp(frame: spec.Basic.Ack | spec.Basic.Nack) -> bytes:
        return ChannelFrame.marshall(channel_number=channel, frames=[frame]).payload

    assert ack_frame(channel, tag) == pamqp(spec.Basic.Ack(delivery_tag=tag))
    for requeue in (True, False):
        expected = pamqp(spec.Basic.Nack(delivery_tag=tag, requeue=requeue))
        assert nack_frame(channel, tag, requeue=requeue) == expected


async def _fill(amqp: AbstractConnection, queue: str, count: int) -> None:
    channel = await amqp.channel()
    await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    for n in range(count):
        await channel.default_exchange.publish(aio_pika.Message(b"%d" % n), routing_key=queue)
    await channel.close()


async def _ready(amqp: AbstractConnection, queue: str, expected: int) -> int:
    """The queue's ready count once it is ``expected`` or after 3 s (a quorum queue takes
    back a closed channel's deliveries a moment after the close)."""
    channel = await amqp.channel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    while True:
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count or 0
        if count == expected or loop.time() > deadline:
            await channel.close()
            return count
        await asyncio.sleep(0.05)


class _Consumer:
    """A raw aiormq consumer that records the deliveries it gets."""

    def __init__(self, underlay: aiormq.abc.AbstractChannel) -> None:
        self.underlay = underlay
        self.deliveries: list[tuple[int, bool]] = []  # (tag, redelivered)
        self._arrived = asyncio.Event()

    async def start(self, queue: str, prefetch: int) -> None:
        await self.underlay.basic_qos(prefetch_count=prefetch)
        await self.underlay.basic_consume(queue, self._on_message)

    async def _on_message(self, message: DeliveredMessage) -> None:
        frame = message.delivery
        assert isinstance(frame, spec.Basic.Deliver)
        self.deliveries.append((frame.delivery_tag or 0, bool(frame.redelivered)))
        self._arrived.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.deliveries) < count:
                self._arrived.clear()
                await self._arrived.wait()


async def test_acks_and_nacks_of_one_round_settle_every_delivery(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    delete_queues(uid)
    await _fill(amqp, uid, 50)
    channel = await amqp.channel()
    consumer = _Consumer(await channel.get_underlay_channel())
    await consumer.start(uid, 50)
    await consumer.wait_for(50)
    acks = acks_of(consumer.underlay)
    assert acks_of(consumer.underlay) is acks
    tags = [tag for tag, _ in consumer.deliveries]

    for tag in tags[:40]:
        acks.ack(tag)
    for tag in tags[40:]:
        acks.nack(tag, requeue=True)

    # The requeued ten come back (only they: the forty are settled) ...
    await consumer.wait_for(60)
    await asyncio.sleep(0.2)
    again = consumer.deliveries[50:]
    assert len(again) == 10
    assert all(redelivered for _, redelivered in again)
    # ... and acknowledged right before the close, none is handed back.
    for tag, _ in again:
        acks.ack(tag)
    await acks.flush()
    await channel.close()
    assert await _ready(amqp, uid, 0) == 0


async def test_acks_on_a_closed_channel_raise_and_leave_the_deliveries_queued(
    amqp: AbstractConnection, uid: str, delete_queues: Callable[[str], None]
) -> None:
    delete_queues(uid)
    await _fill(amqp, uid, 5)
    channel = await amqp.channel()
    consumer = _Consumer(await channel.get_underlay_channel())
    await consumer.start(uid, 5)
    await consumer.wait_for(5)
    await channel.close()

    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        acks_of(consumer.underlay).ack(consumer.deliveries[0][0])
    await acks_of(consumer.underlay).flush()

    assert await _ready(amqp, uid, 5) == 5
