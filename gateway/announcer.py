"""Lifecycle events the gateway publishes without waiting: the ``queued`` event.

A submission's record must exist from the moment it is accepted (a client
polls ``GET /api/v1/executions/{id}`` right after the 200), yet nothing but the
submission's own confirm may stand between the client and its answer. So the
event goes out on a channel without publisher confirms: a handler only appends
to a list, and once per event-loop iteration (or ``POLOS_QUEUED_EVENT_LINGER_SECONDS``
after a round's first event) everything appended becomes one
``EventBatch`` message per project (``schemas.dispatch.encode_event_batch``:
the events joined as they are, no re-encoding), marshalled and handed to
aiormq's writer as one frame run (one system call, no task). So a round of
submissions costs the broker one enqueue into ``polos.recorder``, not one
each. Only when the channel is being restored, or the connection's write
queue is full, does a task wait for it. If the broker is away the round is
dropped (logged): the record then appears with the dispatcher's first event
instead.

Bounded: at most ``MAX_PENDING`` events wait for a flush (more are dropped,
counted in ``dropped``), and a message carries at most ``MAX_BATCH_EVENTS``
events or about ``MAX_BATCH_BYTES`` bytes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq import spec
from aiormq.abc import ChannelFrame

from broker.frames import PERSISTENT, publish_frames
from schemas.dispatch import encode_event_batch
from schemas.topology import EVENTS_EXCHANGE, event_batch_routing_key

log = logging.getLogger(__name__)

MAX_PENDING = 10_000
MAX_BATCH_EVENTS = 1000
MAX_BATCH_BYTES = 1 << 20

# One message of a round: (routing key, body, how many events it carries).
_Message = tuple[str, bytes, int]


class Announcer:
    def __init__(self, *, linger: float = 0.0) -> None:
        # 0: flush on the next loop round; more: that long after a round's first event,
        # so one message carries more submissions (fewer enqueues at low rates).
        self._linger = linger
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.Channel | None = None
        self._pending: list[tuple[str, bytes]] = []
        self._scheduled = False
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    async def start(self, connection: AbstractConnection) -> None:
        self._channel = await connection.channel(publisher_confirms=False)

    async def close(self, timeout: float = 1.0) -> None:
        """Let what is pending go out before the connection closes (for a moment)."""
        if self._pending and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush())
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(task, return_exceptions=True)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def send(self, project_id: str, body: bytes) -> None:
        """Queue one encoded LifecycleEvent of ``project_id`` for the next flush; never
        raises, never waits."""
        if self._channel is None or len(self._pending) >= MAX_PENDING:
            self._drop(1, "not connected" if self._channel is None else "too many pending")
            return
        self._pending.append((project_id, body))
        if not self._scheduled and self._task is None:
            # Once per loop iteration (or linger), after the handlers that run in it.
            self._scheduled = True
            loop = asyncio.get_running_loop()
            if self._linger > 0:
                loop.call_later(self._linger, self._flush_soon)
            else:
                loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        """The usual round: written synchronously, no task, no lock to wait for."""
        self._scheduled = False
        if self._task is not None or not self._pending:
            return  # the slow path has them
        underlay = self._underlay
        # No RPC of its own runs on this channel once it is open (a close makes it
        # closed first), so there is no channel lock to take here.
        if underlay is None or underlay.is_closed or underlay.write_queue.full():
            self._task = asyncio.get_running_loop().create_task(self._flush(), name="announce")
            return
        batch, self._pending = self._pending, []
        try:
            payload, count = self._marshal(underlay, batch)
            underlay.write_queue.put_nowait(ChannelFrame(payload, should_close=False))
        except Exception as exc:
            self._drop(len(batch), repr(exc))
        else:
            self.sent += count

    async def _flush(self) -> None:
        """The slow path: (re)find the channel, and wait for room in the write queue."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    self.sent += await self._send(batch)
                except Exception as exc:
                    self._drop(len(batch), repr(exc))
        finally:
            self._task = None

    async def _send(self, batch: list[tuple[str, bytes]]) -> int:
        """Write ``batch``; how many events were written."""
        assert self._channel is not None
        if self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
        underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        if not all(hasattr(underlay, name) for name in ("lock", "write_queue", "max_content_size")):
            for routing_key, body, _count in _messages(batch):  # an aiormq we do not know
                await underlay.basic_publish(
                    body,
                    exchange=EVENTS_EXCHANGE,
                    routing_key=routing_key,
                    properties=_properties(uuid.uuid4().hex),
                    wait=False,
                )
            return len(batch)
        self._underlay = underlay
        payload, count = self._marshal(underlay, batch)
        async with underlay.lock:
            await underlay.write_queue.put(ChannelFrame(payload, should_close=False))
        return count

    def _marshal(
        self, underlay: aiormq.Channel, batch: list[tuple[str, bytes]]
    ) -> tuple[bytes, int]:
        """The whole round as one write for aiormq's writer: a message per project, frames
        from ``broker.frames`` (``basic_publish`` costs several times as much; without
        confirms there is no delivery tag to register). How many events it carries."""
        number = underlay.number
        size = underlay.max_content_size
        parts = []
        sent = 0
        for routing_key, body, count in _messages(batch):
            parts.append(_event_frames(number, routing_key, body, uuid.uuid4().hex, size))
            sent += count
        return b"".join(parts), sent

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        # The first time, then once per thousand: a broker away must not flood the log.
        if self.dropped == count or (self.dropped - count) // 1000 != self.dropped // 1000:
            log.warning(
                "%d queued event(s) not published (%s); %d so far", count, why, self.dropped
            )


def _messages(batch: list[tuple[str, bytes]]) -> list[_Message]:
    """The round's events as batch messages: per project, bounded in count and size."""
    by_project: dict[str, list[bytes]] = {}
    for project_id, body in batch:
        by_project.setdefault(project_id, []).append(body)
    messages: list[_Message] = []
    for project_id, bodies in by_project.items():
        key = event_batch_routing_key(project_id)
        start, size = 0, 0
        for i, body in enumerate(bodies):
            if i > start and (i - start >= MAX_BATCH_EVENTS or size + len(body) > MAX_BATCH_BYTES):
                messages.append((key, encode_event_batch(bodies[start:i]), i - start))
                start, size = i, 0
            size += len(body)
        messages.append((key, encode_event_batch(bodies[start:]), len(bodies) - start))
    return messages


def _event_frames(
    channel: int, routing_key: str, body: bytes, message_id: str, max_content_size: int
) -> bytes:
    """One message's frames: to ``polos.events``, persistent, not mandatory."""
    return publish_frames(
        channel,
        EVENTS_EXCHANGE,
        routing_key,
        body,
        message_id=message_id,
        max_content_size=max_content_size,
    )


def _properties(message_id: str) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type="application/json", delivery_mode=PERSISTENT, message_id=message_id
    )
