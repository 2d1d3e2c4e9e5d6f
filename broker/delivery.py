"""Deliveries handed to a consumer without a task each, where it asks for that.

aiormq runs every delivery's consumer callback in a task of its own
(``Channel._on_deliver_frame``: ``create_task(consumer(message))`` and a done
callback): about 10-18 µs per delivery on this machine, for a callback that in
the dispatcher does all its work before its first await. A consumer made with
``immediate(callback)`` is called in the reader's own step instead, in
delivery order, with nothing to schedule; an exception it raises is logged
(as aiormq logs a consumer task's) and never reaches the reader. Every other
consumer runs as aiormq runs it.

``install()`` patches aiormq's ``Channel._on_deliver_frame`` (process-wide,
idempotent) and does nothing when the installed aiormq does not look as
expected; ``immediate`` callbacks then still work, as coroutines in tasks.

An ``immediate`` callback may also be given to aio-pika's ``Queue.consume``
(so that a robust queue consumes again with it after a reconnect): aio-pika
registers it wrapped in its own ``consumer`` (which makes an
``IncomingMessage`` and runs the callback in one more task), and the patch
recognises that wrapper and calls the callback with aiormq's message, as it
does for a direct ``basic_consume``. Not installed, the callback gets the
same message rebuilt from aio-pika's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, cast

import aio_pika.queue
import aiormq
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

log = logging.getLogger(__name__)

_MARK = "_polos_immediate"

ConsumerCallback = Callable[[Any], Coroutine[Any, Any, None]]
Callback = Callable[[DeliveredMessage], None]

# How aio-pika's Queue.consume registers a callback: partial(consumer, callback, no_ack=...).
_AIO_PIKA_CONSUMER = getattr(aio_pika.queue, "consumer", None)


def immediate(callback: Callback) -> ConsumerCallback:
    """A consumer callback for ``basic_consume`` (or aio-pika's ``Queue.consume``)
    that is called without a task (once ``install()`` ran); it must not block or await."""

    async def as_task(message: DeliveredMessage | AbstractIncomingMessage) -> None:
        # aiormq's (or aio-pika's) way, if not installed.
        if not isinstance(message, DeliveredMessage):
            message = _delivered(message)
        callback(message)

    setattr(as_task, _MARK, callback)
    return as_task


def immediate_callback(consumer: object) -> Callback | None:
    """The ``immediate`` callback an aiormq consumer calls, directly or through
    aio-pika's queue consumer; None for any other."""
    found = getattr(consumer, _MARK, None)
    if (
        found is None
        and isinstance(consumer, functools.partial)
        and consumer.func is _AIO_PIKA_CONSUMER
        and consumer.args
    ):
        found = getattr(consumer.args[0], _MARK, None)
    return cast("Callback | None", found)


def _delivered(message: AbstractIncomingMessage) -> DeliveredMessage:
    """aiormq's message again, from aio-pika's (what the callback would have had)."""
    properties = spec.Basic.Properties(
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=cast(Any, message.headers),
        delivery_mode=int(message.delivery_mode),
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        message_type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
    )
    deliver = spec.Basic.Deliver(
        consumer_tag=message.consumer_tag or "",
        delivery_tag=message.delivery_tag or 0,
        redelivered=bool(message.redelivered),
        exchange=message.exchange or "",
        routing_key=message.routing_key or "",
    )
    header = ContentHeader(body_size=len(message.body), properties=properties)
    return DeliveredMessage(
        delivery=deliver, header=header, body=message.body, channel=message.channel
    )


_INTERNALS = ("_Channel__get_content_header", "_read_content", "_on_deliver_frame")
_installed = False


def install() -> bool:
    """Call ``immediate`` consumers in the reader's step; False if aiormq's
    channel is not as expected (then every consumer runs in a task, as before)."""
    global _installed
    if _installed:
        return True
    channel_class = cast(Any, aiormq.Channel)
    if not all(hasattr(channel_class, name) for name in _INTERNALS):
        log.warning("aiormq's Channel is not what broker.delivery expects: not used")
        return False
    original = channel_class._on_deliver_frame

    async def _on_deliver_frame(self: Any, frame: Any) -> None:
        if frame.consumer_tag is None:
            await original(self, frame)
            return
        if immediate_callback(self.consumers.get(frame.consumer_tag)) is None:
            await original(self, frame)
            return
        header = await self._Channel__get_content_header()
        message = await self._read_content(frame, header)
        # Looked up again, as aiormq does once the content is read: it may be gone.
        now = immediate_callback(self.consumers.get(frame.consumer_tag))
        if now is None:
            return
        try:
            now(message)
        except Exception:
            log.exception("a consumer of %s failed on a delivery", frame.routing_key)

    channel_class._on_deliver_frame = _on_deliver_frame
    _installed = True
    return True
