"""The channels a ``ConfirmedPublisher`` publishes on: opened with confirms, used in
turn, and one that got a nack replaced by a fresh one.

Each channel has its ``Batch`` (broker/confirms.py), and all share one
``Deadlines`` timer for their confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from broker.confirms import Batch, Deadlines
from broker.errors import BrokerUnavailable

log = logging.getLogger(__name__)

# A channel replaced after a nack is not replaced again within this time.
RENEW_SECONDS = 0.5


class ChannelPool:
    """``size`` confirm channels of ``connection``, each with its batch."""

    def __init__(
        self, connection: AbstractConnection, *, size: int, confirm_timeout: float
    ) -> None:
        self._connection = connection
        self._confirm_timeout = confirm_timeout
        self._size = max(1, size)
        self._channels: list[AbstractChannel] = []
        self._batches: list[Batch] = []
        self.deadlines = Deadlines(confirm_timeout)
        self._next = itertools.cycle(range(self._size))
        self._renewals: list[asyncio.Task[None] | None] = [None] * self._size
        self._renewed_at = [-RENEW_SECONDS] * self._size
        self._retiring: dict[AbstractChannel, asyncio.Task[None]] = {}

    async def open(self) -> None:
        for _ in range(self._size):
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._channels.append(channel)
            self._batches.append(Batch(channel))

    async def close(self) -> None:
        for batch in self._batches:
            await batch.close()
        self._batches.clear()
        await self.deadlines.close()
        for task in self._retiring.values():
            task.cancel()
        for channel in [*self._channels, *self._retiring]:
            if not channel.is_closed:
                await channel.close()
        self._channels.clear()
        self._retiring.clear()

    @property
    def available(self) -> bool:
        """Whether a publish can be attempted now (connection and a channel open)."""
        if self._connection.is_closed or not self._channels:
            return False
        return any(not channel.is_closed for channel in self._channels)

    def pick(self) -> Batch:
        """The batch of the next open channel, in turn."""
        if self._connection.is_closed or not self._channels:
            raise BrokerUnavailable("not connected to the broker")
        for _ in range(self._size):
            index = next(self._next)
            if not self._channels[index].is_closed:
                return self._batches[index]
        raise BrokerUnavailable("no open channel to the broker")

    async def replacement(self, nacked: Batch) -> Batch | None:
        """After a nack on ``nacked``: the batch of a fresh channel to try once more, or
        None when ``nacked`` is itself fresh (the queue really is full).

        RabbitMQ 3.10 nacks, for good, every publish of a channel whose first
        publish to a quorum queue came while that queue had no leader (a node
        was lost a moment ago): a channel that a process opened on failing
        over. A new channel starts clean; opened once per RENEW_SECONDS at most.
        """
        if nacked not in self._batches:
            return None  # closing
        index = self._batches.index(nacked)
        task = self._renewals[index]
        if task is None or task.done():
            loop = asyncio.get_running_loop()
            if loop.time() - self._renewed_at[index] < RENEW_SECONDS:
                return None
            self._renewed_at[index] = loop.time()
            task = self._renewals[index] = loop.create_task(self._renew(index))
        await asyncio.shield(task)
        current = self._batches[index] if index < len(self._batches) else None
        return current if current is not nacked else None

    async def _renew(self, index: int) -> None:
        try:
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.warning("cannot replace a publishing channel: %r", exc)
            return
        old = self._channels[index]
        self._channels[index] = channel
        self._batches[index] = Batch(channel)
        log.info("replaced a publishing channel after a nack")
        self._retiring[old] = asyncio.get_running_loop().create_task(self._retire(old))

    async def _retire(self, channel: AbstractChannel) -> None:
        # Its publishes in flight get their confirms, or time out, meanwhile.
        await asyncio.sleep(self._confirm_timeout)
        self._retiring.pop(channel, None)
        with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            await channel.close()
