"""Work deliveries: settling them, and remembering which ones to drop."""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import ChannelInvalidStateError, MessageProcessError

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
    MessageProcessError,
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


# aio-pika's own mark of a settled message (a second ack or nack raises
# ``MessageProcessError``); where it is missing, messages settle through aio-pika.
_PROCESSED = "_IncomingMessage__processed"


async def settle(message: AbstractIncomingMessage, *, requeue: bool | None = None) -> bool:
    """Ack (or nack with requeue) a delivery; whether it could be.

    The frame is queued for the channel's next write with the other settlements
    of this event-loop round (``broker.acks``), not awaited on the socket;
    ``flush_settlements`` before closing a channel on purpose. A delivery whose
    channel died is already back in its queue.
    """
    try:
        if not hasattr(message, _PROCESSED):
            if requeue is None:
                await message.ack()
            else:
                await message.nack(requeue=requeue)
            return True
        if message.processed:
            raise MessageProcessError("Message already processed", message)
        acks = acks_of(message.channel)  # ChannelInvalidStateError once it is closed
        tag = message.delivery_tag
        if tag is not None:
            if requeue is None:
                acks.ack(tag)
            else:
                acks.nack(tag, requeue=requeue)
        setattr(message, _PROCESSED, True)
        if not message.locked:
            message.lock()
    except SETTLE_ERRORS as exc:
        log.info("could not settle a delivery (%r); the broker requeues it", exc)
        return False
    return True


async def flush_settlements() -> None:
    """Until every settlement queued so far is with the connection's writer."""
    await flush_all()


@dataclass(eq=False, slots=True)
class Delivery:
    """A work delivery to run: a slot of the intake, then an execution."""

    work: WorkMessage
    message: AbstractIncomingMessage
    handler: Handler
    policy: RetryPolicy

    @property
    def key(self) -> tuple[str, str]:
        return (self.work.submission.execution_id, self.work.dispatch_id)

    @property
    def alive(self) -> bool:
        return channel_open(self.message)


def channel_open(message: AbstractIncomingMessage) -> bool:
    """Whether ``message`` can still be settled (its channel is open)."""
    try:
        return not message.channel.is_closed
    except ChannelInvalidStateError:
        return False
