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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, cast

import aiormq
from aiormq.abc import DeliveredMessage

log = logging.getLogger(__name__)

_MARK = "_polos_immediate"

ConsumerCallback = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]


def immediate(callback: Callable[[DeliveredMessage], None]) -> ConsumerCallback:
    """A consumer callback for ``basic_consume`` that is called without a task
    (once ``install()`` ran); it must not block or await."""

    async def as_task(message: DeliveredMessage) -> None:  # aiormq's way, if not installed
        callback(message)

    setattr(as_task, _MARK, callback)
    return as_task


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
        if getattr(self.consumers.get(frame.consumer_tag), _MARK, None) is None:
            await original(self, frame)
            return
        header = await self._Channel__get_content_header()
        message = await self._read_content(frame, header)
        # Looked up again, as aiormq does once the content is read: it may be gone.
        now = getattr(self.consumers.get(frame.consumer_tag), _MARK, None)
        if now is None:
            return
        try:
            now(message)
        except Exception:
            log.exception("a consumer of %s failed on a delivery", frame.routing_key)

    channel_class._on_deliver_frame = _on_deliver_frame
    _installed = True
    return True
