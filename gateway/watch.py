"""Live lifecycle events for the event streams (``GET /api/v1/executions/{id}/events``).

    polos.events ──#.<execution_id> (one binding per watched execution)──►
        one exclusive auto-delete queue per gateway process ──► Watch ──► the streams

A process has one queue however many streams it serves; a binding exists while
at least one stream watches its execution (the first stream binds, the last
one to go unbinds), and events fan out in process. Bindings are made before a
stream reads the current record, so no event falls between the two.

The queue is exclusive to our connection: if the gateway dies, the broker
deletes it with its bindings. aio-pika restores queue, bindings and consumer
after a reconnect; events published meanwhile are missed, so every stream is
told to read its record again (``RESYNC``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from broker.errors import BrokerUnavailable
from schemas.dispatch import LifecycleEvent, decode_lifecycle
from schemas.topology import EVENTS_EXCHANGE

log = logging.getLogger(__name__)


class Signal:
    """Not an event: the stream must read the record again, or end."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


RESYNC = Signal("resync")
END = Signal("end")

Item = tuple[LifecycleEvent, bytes] | Signal


@dataclass(eq=False)
class Subscription:
    project_id: str
    execution_id: str
    key_id: str  # whose stream: revoking the key ends it
    inbox: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class _Watched:
    subscriptions: set[Subscription] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    bound: bool = False


def binding_key(execution_id: str) -> str:
    """``schemas.topology.event_routing_key`` ends with the execution id."""
    return f"#.{execution_id}"


class Watch:
    def __init__(self) -> None:
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._open_lock = asyncio.Lock()
        self._watched: dict[str, _Watched] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.queue_name = f"polos.gateway.events.{socket.gethostname()}.{os.getpid()}."
        self.queue_name += uuid.uuid4().hex[:8]

    @property
    def bindings(self) -> int:
        return sum(1 for watched in self._watched.values() if watched.bound)

    @property
    def streams(self) -> int:
        return sum(len(watched.subscriptions) for watched in self._watched.values())

    async def subscribe(
        self,
        connection: AbstractRobustConnection | None,
        project_id: str,
        execution_id: str,
        key_id: str,
    ) -> Subscription:
        """Events of ``execution_id`` from now on; raises BrokerUnavailable."""
        queue = await self._open(connection)
        subscription = Subscription(project_id, execution_id, key_id)
        watched = self._watched.get(execution_id)
        if watched is None:
            watched = self._watched[execution_id] = _Watched()
        watched.subscriptions.add(subscription)
        try:
            async with watched.lock:
                if not watched.bound:
                    await queue.bind(EVENTS_EXCHANGE, binding_key(execution_id))
                    watched.bound = True
        except BaseException as exc:
            self.unsubscribe(subscription)
            if isinstance(exc, Exception):
                raise BrokerUnavailable(f"cannot watch {execution_id}: {exc!r}") from exc
            raise
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """The stream is gone; the last one of an execution takes the binding away."""
        watched = self._watched.get(subscription.execution_id)
        if watched is None or subscription not in watched.subscriptions:
            return
        watched.subscriptions.discard(subscription)
        if not watched.subscriptions:
            self._spawn(self._unbind(subscription.execution_id, watched))

    async def _unbind(self, execution_id: str, watched: _Watched) -> None:
        async with watched.lock:
            if watched.subscriptions:
                return  # someone came back meanwhile
            if watched.bound and self._queue is not None:
                try:
                    await self._queue.unbind(EVENTS_EXCHANGE, binding_key(execution_id))
                except Exception as exc:
                    # The channel is gone; so is the binding once the queue goes.
                    log.debug("unbinding %s failed: %r", execution_id, exc)
            watched.bound = False
            if watched.subscriptions:
                # A stream joined while we were unbinding: it waits for this
                # lock and binds again, in this entry, which must stay.
                return
            if self._watched.get(execution_id) is watched:
                del self._watched[execution_id]

    def end_all(self) -> None:
        """Shutdown: every stream ends now (its client reconnects to another gateway)."""
        self.end_if(lambda _project_id, _key_id: True)

    def end_if(self, ended: Callable[[str, str], bool]) -> int:
        """End the streams for which ``ended(project_id, key_id)``; how many."""
        count = 0
        for watched in self._watched.values():
            for subscription in watched.subscriptions:
                if ended(subscription.project_id, subscription.key_id):
                    subscription.inbox.put_nowait(END)
                    count += 1
        return count

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _open(self, connection: AbstractRobustConnection | None) -> AbstractQueue:
        if self._queue is not None and self._channel is not None and not self._channel.is_closed:
            return self._queue
        if connection is None or connection.is_closed:
            raise BrokerUnavailable("not connected to the broker")
        async with self._open_lock:
            if self._queue is not None and self._channel and not self._channel.is_closed:
                return self._queue
            try:
                channel = await connection.channel(publisher_confirms=False)
                queue = await channel.declare_queue(
                    self.queue_name, exclusive=True, auto_delete=True
                )
                await queue.consume(self._on_message, no_ack=True)
            except Exception as exc:
                raise BrokerUnavailable(f"cannot open the event queue: {exc!r}") from exc
            if self._connection is not connection:
                connection.reconnect_callbacks.add(self._reconnected)
                self._connection = connection
            self._channel, self._queue = channel, queue
            return queue

    def _reconnected(self, *_args: object) -> None:
        for watched in self._watched.values():
            for subscription in watched.subscriptions:
                subscription.inbox.put_nowait(RESYNC)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = decode_lifecycle(message.body)
        except (ValidationError, ValueError) as exc:
            log.warning("ignoring an undecodable lifecycle event: %s", exc)
            return
        watched = self._watched.get(event.execution_id)
        if watched is None:
            return
        for subscription in watched.subscriptions:
            if subscription.project_id == event.project_id:
                subscription.inbox.put_nowait((event, message.body))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
