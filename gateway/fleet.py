"""What the operator page knows about the queues: who owns them and how deep they are.

    dispatchers ──DispatcherStatus every few s──► polos.status (fanout)
        ──► one exclusive queue per gateway, opened on the page's first request ──► Fleet

Per queue: its owner (a dispatcher id), limit, slots held and recent rates (the
difference between two statuses of its owner), from the statuses; its depth
(messages ready) from a passive declare, asked only while someone looks, for
at most ``MAX_DEPTH_PROBES`` queues and at most once per ``DEPTH_CACHE_SECONDS``.
A gateway nobody asks for the page never subscribes and never probes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections import deque
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from pydantic import ValidationError

from broker.topology import declare_status_exchange
from schemas.status import DispatcherStatus, QueueStatus, decode_status

log = logging.getLogger(__name__)

MAX_DEPTH_PROBES = 200
DEPTH_CACHE_SECONDS = 2.0
RATE_WINDOW_SECONDS = 30.0
SAMPLES_KEPT = 16
FINISHED = ("completed", "failed", "timed_out", "cancelled", "deduplicated")


@dataclass(slots=True)
class Owned:
    """One owned queue, as its owner last told."""

    dispatcher_id: str
    status: QueueStatus
    admitted_per_s: float | None
    finished_per_s: float | None


class Fleet:
    def __init__(self) -> None:
        self._samples: dict[str, deque[tuple[float, DispatcherStatus]]] = {}
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._lock = asyncio.Lock()
        self._depths: dict[str, int | None] = {}
        self._depths_at = -DEPTH_CACHE_SECONDS
        self.queue_name = f"polos.gateway.status.{socket.gethostname()}.{os.getpid()}."
        self.queue_name += uuid.uuid4().hex[:8]

    async def follow(self, connection: AbstractRobustConnection) -> None:
        """Subscribe to the statuses (once; aio-pika restores it after a reconnect)."""
        if self._queue is not None:
            return
        async with self._lock:
            if self._queue is not None:
                return
            channel = await connection.channel(publisher_confirms=False)
            exchange = await declare_status_exchange(channel)
            queue = await channel.declare_queue(
                self.queue_name,
                exclusive=True,
                auto_delete=True,
                # A gateway that stopped reading keeps a bounded few, never a backlog.
                arguments={"x-message-ttl": 10_000, "x-max-length": 1000},
            )
            await queue.bind(exchange)
            await queue.consume(self._on_status, no_ack=True)
            self._channel, self._queue = channel, queue

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = self._queue = None

    async def _on_status(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            status = decode_status(message.body)
        except (ValidationError, ValueError) as exc:
            log.debug("ignoring an undecodable dispatcher status: %s", exc)
            return
        now = asyncio.get_running_loop().time()
        samples = self._samples.setdefault(status.dispatcher_id, deque(maxlen=SAMPLES_KEPT))
        samples.append((now, status))

    def dispatchers(self) -> list[DispatcherStatus]:
        """The latest status of every dispatcher heard from lately."""
        now = asyncio.get_running_loop().time()
        alive = []
        for dispatcher_id, samples in list(self._samples.items()):
            received, status = samples[-1]
            if now - received > 3 * max(status.interval_seconds, 1.0):
                del self._samples[dispatcher_id]  # gone (or cut off): not an owner any more
                continue
            alive.append(status)
        return alive

    def owned(self) -> dict[tuple[str, str], Owned]:
        alive = {status.dispatcher_id for status in self.dispatchers()}
        owned: dict[tuple[str, str], Owned] = {}
        for dispatcher_id in alive:
            samples = self._samples[dispatcher_id]
            received, latest = samples[-1]
            oldest = next(((t, s) for t, s in samples if received - t <= RATE_WINDOW_SECONDS), None)
            before = {}
            elapsed = 0.0
            if oldest is not None and oldest[0] < received:
                elapsed = latest.at - oldest[1].at
                before = {(q.project_id, q.queue_name): q for q in oldest[1].queues}
            for queue in latest.queues:
                key = (queue.project_id, queue.queue_name)
                old = before.get(key)
                admitted = finished = None
                if old is not None and elapsed > 0:
                    admitted = _rate(queue, old, ("admitted",), elapsed)
                    finished = _rate(queue, old, FINISHED, elapsed)
                owned[key] = Owned(dispatcher_id, queue, admitted, finished)
        return owned

    async def depths(
        self, connection: AbstractRobustConnection, names: list[str]
    ) -> dict[str, int | None]:
        """Messages ready in each queue (None: it does not exist), cached for a moment."""
        loop = asyncio.get_running_loop()
        wanted = names[:MAX_DEPTH_PROBES]
        fresh = loop.time() - self._depths_at < DEPTH_CACHE_SECONDS
        if fresh and all(name in self._depths for name in wanted):
            return self._depths
        depths: dict[str, int | None] = {}
        channel = await connection.channel(publisher_confirms=False)
        try:
            for name in wanted:
                try:
                    queue = await channel.declare_queue(name, passive=True)
                    depths[name] = queue.declaration_result.message_count or 0
                except aio_pika.exceptions.ChannelClosed:
                    depths[name] = None  # a 404 closes the channel: take another
                    channel = await connection.channel(publisher_confirms=False)
        finally:
            if not channel.is_closed:
                await channel.close()
        self._depths, self._depths_at = depths, loop.time()
        return depths


def _rate(new: QueueStatus, old: QueueStatus, statuses: tuple[str, ...], seconds: float) -> float:
    delta = sum(new.counts.get(s, 0) - old.counts.get(s, 0) for s in statuses)
    return max(0.0, delta) / seconds
