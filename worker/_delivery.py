"""Work deliveries: settling them, and remembering which ones to drop.

A work delivery is aiormq's message, taken without aio-pika's ``IncomingMessage``
and without a task (``broker.delivery``); it is settled with ``broker.acks``
on the aiormq channel it came on, whose closing hands it back to the queue.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.abc import DeliveredMessage

from broker.acks import acks_of, flush_all
from schemas.dispatch import WorkMessage
from worker._context import ExecutionContext
from worker._retry import RetryPolicy

log = logging.getLogger("worker")

Handler = Callable[[ExecutionContext, Any], Awaitable[Any]]

# How many cancelled executions and finished dispatches are remembered to drop
# a late redelivery of one; a bounded memory, not a guarantee (the dispatcher
# ignores results of terminal executions anyway).
RECENT_IDS = 10_000

SETTLE_ERRORS = (
    ChannelInvalidStateError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    RuntimeError,
)


class Recent:
    """A bounded set: the oldest entries are forgotten first."""

    def __init__(self, size: int = RECENT_IDS) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, item: Hashable) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        return item in self._items


async def close_quietly(connection: AbstractRobustConnection | None) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):
            await connection.close()


class Received:
    """A work delivery as aiormq handed it (``broker.delivery``): what the worker
    reads of it, and whether it is settled (a second ack or nack is refused)."""

    __slots__ = ("body", "channel", "message_id", "redelivered", "settled", "tag")

    def __init__(self, message: DeliveredMessage) -> None:
        self.channel = message.channel
        self.body = message.body
        self.message_id: str | None = message.header.properties.message_id
        frame = message.delivery
        self.tag: int = getattr(frame, "delivery_tag", None) or 0
        self.redelivered: bool = bool(getattr(frame, "redelivered", False))
        self.settled = False

    @property
    def alive(self) -> bool:
        """Whether it can still be settled (its channel is open)."""
        return not self.channel.is_closed


def settle(message: Received, *, requeue: bool | None = None) -> bool:
    """Ack (or nack with requeue) a delivery; whether it could be.

    The frame is queued for the channel's next write with the other settlements
    of this event-loop round (``broker.acks``), not awaited on the socket;
    ``flush_settlements`` before closing a channel on purpose. A delivery whose
    channel died is already back in its queue.
    """
    if message.settled:
        log.info("could not settle a delivery (settled already)")
        return False
    try:
        acks = acks_of(message.channel)
        if requeue is None:
            acks.ack(message.tag)  # ChannelInvalidStateError once the channel is closed
        else:
            acks.nack(message.tag, requeue=requeue)
    except SETTLE_ERRORS as exc:
        log.info("could not settle a delivery (%r); the broker requeues it", exc)
        return False
    message.settled = True
    return True


async def flush_settlements() -> None:
    """Until every settlement queued so far is with the connection's writer."""
    await flush_all()


@dataclass(eq=False, slots=True)
class Delivery:
    """A work delivery to run: a slot of the intake, then an execution."""

    work: WorkMessage
    message: Received
    handler: Handler
    policy: RetryPolicy

    @property
    def key(self) -> tuple[str, str]:
        return (self.work.submission.execution_id, self.work.dispatch_id)

    @property
    def alive(self) -> bool:
        return self.message.alive
