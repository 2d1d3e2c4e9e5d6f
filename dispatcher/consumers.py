"""Many consumers on a few channels, each consumer with its own prefetch.

``basic.qos`` with ``global=false`` applies to the consumers started after it
on a channel, so setting it right before each ``basic.consume`` (under a lock,
so no other consume slips in between) gives every consumer its own window
without a channel per queue: a dispatcher owning thousands of queues needs
``queues / POLOS_DISPATCHER_CONSUMERS_PER_CHANNEL`` channels, far below ``channel_max``.

Consumers of one kind share channels only with their own kind
(``consume(kind=...)``): an acknowledgement stands for many of its channel's
deliveries only while none below it is still held (``broker.acks``), and the
results queues' ledger records, each held until the next checkpoint, would
stop the submissions' acknowledgements from coalescing on a shared channel.

A channel that closes under us hands every delivery we hold on it back to its
queue, so the state kept for those deliveries is void: ``on_lost`` tells the
session, which is then rebuilt from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from broker.acks import Acks, acks_of
from broker.delivery import immediate

log = logging.getLogger(__name__)

# What a closed channel or connection raises from aiormq on ack/nack/cancel.
CHANNEL_GONE = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)


@dataclass(slots=True, eq=False)
class Delivery:
    """One delivered message we have not settled yet."""

    acks: Acks  # of its channel
    tag: int
    body: bytes
    redelivered: bool
    # How many times a quorum queue handed this message out before (0 the first
    # time): which decision about it is the latest (``LifecycleEvent.attempt``).
    attempt: int = 0

    async def ack(self) -> None:
        # Queued, not awaited on the socket: the acknowledgements of a flush go out
        # in one write (broker.acks). A channel that is gone has requeued the
        # message already; the next owner settles it.
        with contextlib.suppress(*CHANNEL_GONE):
            self.acks.ack(self.tag)

    async def nack(self, *, requeue: bool = True) -> None:
        with contextlib.suppress(*CHANNEL_GONE):
            self.acks.nack(self.tag, requeue=requeue)


def delivery_attempt(headers: Mapping[str, Any] | None) -> int:
    """Earlier deliveries of a quorum-queue message, from the headers the broker adds.

    ``x-delivery-count`` counts every return to the queue (nack, a closed
    channel) on RabbitMQ 3.x to 4.2; 4.3 narrows it to failed deliveries and
    counts every hand-out in ``x-acquired-count``, which we prefer. Absent on
    a first delivery (and on classic queues): 0.
    """
    if not headers:
        return 0
    for name in ("x-acquired-count", "x-delivery-count"):
        value = headers.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


OnMessage = Callable[[Delivery], None]
OnCancelled = Callable[[], None]


@dataclass(slots=True, eq=False)
class Consumer:
    queue: str
    prefetch: int
    on_message: OnMessage
    on_cancelled: OnCancelled
    slot: _Slot
    tag: str = ""


@dataclass(slots=True, eq=False)
class _Slot:
    kind: str
    channel: AbstractChannel
    underlay: aiormq.abc.AbstractChannel
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    reserved: int = 0


class ConsumerPool:
    def __init__(
        self,
        connection: AbstractConnection,
        *,
        per_channel: int,
        on_lost: Callable[[BaseException | None], None],
    ) -> None:
        self._connection = connection
        self._per_channel = per_channel
        self._on_lost = on_lost
        self._slots: list[_Slot] = []
        self._open_lock = asyncio.Lock()
        self._closing = False

    @property
    def channels(self) -> int:
        return len(self._slots)

    async def consume(
        self,
        queue: str,
        *,
        kind: str,
        prefetch: int,
        on_message: OnMessage,
        on_cancelled: OnCancelled,
    ) -> Consumer:
        """Start consuming ``queue`` on a channel of ``kind``'s; ``on_message`` is called
        in delivery order.

        Raises aiormq/aio-pika errors; a failed consume closes its channel and
        so ends the session (``on_lost``).
        """
        slot = await self._reserve(kind)
        consumer = Consumer(queue, prefetch, on_message, on_cancelled, slot)
        acks = acks_of(slot.underlay)

        @immediate
        def deliver(message: DeliveredMessage) -> None:
            # Called in delivery order, without a task each (broker.delivery):
            # the owner does nothing with it that awaits.
            frame = message.delivery
            assert isinstance(frame, spec.Basic.Deliver)
            consumer.on_message(
                Delivery(
                    acks,
                    frame.delivery_tag or 0,
                    message.body,
                    frame.redelivered,
                    delivery_attempt(message.header.properties.headers),
                )
            )

        try:
            async with slot.lock:
                await slot.underlay.basic_qos(prefetch_count=prefetch)
                ok = await slot.underlay.basic_consume(queue, deliver)
        except BaseException:
            slot.reserved -= 1
            raise
        consumer.tag = ok.consumer_tag or ""
        slot.consumers[consumer.tag] = consumer
        return consumer

    async def cancel(self, consumer: Consumer) -> None:
        slot = consumer.slot
        if slot.consumers.pop(consumer.tag, None) is None:
            return
        slot.reserved -= 1
        with contextlib.suppress(*CHANNEL_GONE):
            await slot.underlay.basic_cancel(consumer.tag)

    async def close(self) -> None:
        self._closing = True
        for slot in self._slots:
            # The acknowledgements made so far go out before the channel's close.
            await acks_of(slot.underlay).flush()
            with contextlib.suppress(*CHANNEL_GONE):
                await slot.channel.close()
        self._slots.clear()

    async def _reserve(self, kind: str) -> _Slot:
        async with self._open_lock:
            for slot in self._slots:
                if (
                    slot.kind == kind
                    and slot.reserved < self._per_channel
                    and not slot.channel.is_closed
                ):
                    slot.reserved += 1
                    return slot
            channel = await self._connection.channel(publisher_confirms=False)
            underlay = await channel.get_underlay_channel()
            slot = _Slot(kind, channel, underlay, reserved=1)
            underlay.on_consumer_cancel_callbacks.add(self._cancelled_by_broker(slot))
            channel.close_callbacks.add(self._channel_closed)
            self._slots.append(slot)
            return slot

    def _cancelled_by_broker(self, slot: _Slot) -> Callable[[spec.Basic.Cancel], None]:
        def on_cancel(frame: spec.Basic.Cancel) -> None:
            consumer = slot.consumers.pop(frame.consumer_tag or "", None)
            if consumer is not None:
                slot.reserved -= 1
                log.warning("the broker cancelled our consumer of %s", consumer.queue)
                consumer.on_cancelled()

        return on_cancel

    def _channel_closed(self, _channel: object, exc: BaseException | None) -> None:
        if not self._closing:
            log.warning("a consumer channel closed: %r", exc)
            self._on_lost(exc)
