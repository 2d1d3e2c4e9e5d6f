"""The broker side of a dispatch: the links an owner uses, and the work queues it fills."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractConnection

from broker.errors import Unroutable
from broker.publisher import ConfirmedPublisher
from broker.topology import declare_work_queue
from dispatcher.consumers import ConsumerPool
from dispatcher.lifecycle import Tunables
from dispatcher.notify import Notifier
from dispatcher.publishers import PinnedPublishers
from dispatcher.settings import Settings


class WorkQueues:
    """Work queues are declared on the first dispatch to a deployment, and again
    if the broker returns a publish as unroutable (the queue was deleted)."""

    def __init__(self, connection: AbstractConnection, *, replicas: int | None = None) -> None:
        self._connection = connection
        self._replicas = replicas
        self._declared: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(self, name: str) -> None:
        if name not in self._declared:
            await self._declare(name)

    async def publish(
        self,
        publisher: ConfirmedPublisher,
        name: str,
        body: bytes,
        *,
        message_id: str,
    ) -> None:
        """Publish to the work queue ``name``, with confirm; raises BrokerError."""
        await self.ensure(name)
        try:
            await publisher.publish(name, body, message_id=message_id)
        except Unroutable:
            self._declared.discard(name)
            await self._declare(name)
            await publisher.publish(name, body, message_id=message_id)

    async def _declare(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._declared:
                await declare_work_queue(self._connection, name, replicas=self._replicas)
                self._declared.add(name)


@dataclass(slots=True)
class Links:
    """What every queue owner of one connection shares."""

    settings: Settings
    owner_id: str  # this session's name in probes and ledger records
    tunables: Tunables
    connection: AbstractConnection
    publisher: ConfirmedPublisher
    dispatch: PinnedPublishers
    notifier: Notifier
    pool: ConsumerPool
    work_queues: WorkQueues
    fail: Callable[[BaseException], None]
    gone: Callable[[str, str], None]
    busy_changed: Callable[[bool], None]
    activity: Callable[[], None]
    # (project, queue, checkpoint, bytes) of each ledger record the broker confirmed.
    ledger_written: Callable[[str, str, bool, int], None]
    # (project, queue, event id): whether the registry delivered that event.
    registry_heard: Callable[[str, str, str], bool]
    # Whether a queue exists (a passive declare on the probe connection, so that
    # a missing one never closes a consumer channel); raises BrokerUnavailable.
    queue_exists: Callable[[str], Awaitable[bool]]
    # (project, queue, count): submissions admitted without the event they name.
    config_timed_out: Callable[[str, str, int], None]
