"""Submission queues as the gateway sees them: declared once, recorded in the registry.

The hot path calls ``ensure`` for every submission; after the first one per
queue it is a set lookup (plus a dict lookup when the submission carries a
concurrency limit or strategy). ``configure_queue`` is the operator's way to the
same registry events (``python -m gateway queues set``).
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractConnection

from broker.connection import Nodes, connect
from broker.publisher import ConfirmedPublisher
from broker.registry import QueueConfig, RegistryState, RegistryWriter, declare_registry
from broker.topology import declare_queue
from schemas.ids import now_rfc3339
from schemas.registry import (
    ConcurrencyStrategy,
    QueueDeclared,
    QueueEvent,
    QueueLimitSet,
    QueueStrategySet,
)
from schemas.topology import submit_queue, submit_queue_arguments


def _differs(
    config: QueueConfig | None, limit: int | None, strategy: ConcurrencyStrategy | None
) -> bool:
    """Whether a submission's limit or strategy is news to the registry (absent: never)."""
    if limit is None and strategy is None:
        return False
    if config is None:
        return True
    return (limit is not None and config.concurrency_limit != limit) or (
        strategy is not None and config.concurrency_strategy != strategy
    )


class QueueDirectory:
    def __init__(
        self,
        connection: AbstractConnection,
        writer: RegistryWriter,
        state: RegistryState,
        *,
        max_length: int,
        replicas: int | None = None,
    ) -> None:
        self._connection = connection
        self._writer = writer
        self._state = state
        self._arguments = submit_queue_arguments(max_length=max_length, replicas=replicas)
        self._declared: set[str] = set()
        self._vanished: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def known(
        self,
        project_id: str,
        queue_name: str,
        limit: int | None,
        strategy: ConcurrencyStrategy | None = None,
    ) -> str | None:
        """The queue's broker name if ``ensure`` has nothing to do for it, else None."""
        name = submit_queue(project_id, queue_name)
        if name not in self._declared:
            return None
        if _differs(self._state.queues.get((project_id, queue_name)), limit, strategy):
            return None
        return name

    async def ensure(
        self,
        project_id: str,
        queue_name: str,
        limit: int | None,
        strategy: ConcurrencyStrategy | None = None,
    ) -> str:
        """The broker name of the queue, declared and recorded; raises BrokerError."""
        name = submit_queue(project_id, queue_name)
        if name in self._declared:
            if _differs(self._state.queues.get((project_id, queue_name)), limit, strategy):
                # Under the queue's lock, and checked again there: a burst of
                # submissions carrying the new limit records it once, not once
                # per submission that arrived while the first was appending.
                async with self._lock(name):
                    await self._record(project_id, queue_name, limit, strategy, name)
            return name
        async with self._lock(name):
            if name not in self._declared:
                await declare_queue(self._connection, name, self._arguments)
                await self._record(
                    project_id, queue_name, limit, strategy, name, name in self._vanished
                )
                self._vanished.discard(name)
                self._declared.add(name)
            elif _differs(self._state.queues.get((project_id, queue_name)), limit, strategy):
                # Declared meanwhile by a submission that waited before us (a batch's
                # items to one new queue): what this one carries is still news.
                await self._record(project_id, queue_name, limit, strategy, name)
        return name

    def _lock(self, name: str) -> asyncio.Lock:
        # Kept for the life of the process: one per queue, as ``_declared`` is.
        # (Dropping it while others wait on it would let a newcomer run beside them.)
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def forget(self, name: str) -> None:
        """The queue vanished (deleted by an operator): declare it again next time,
        and record it again then: dispatchers that saw it missing look for it on a
        registry event, not by polling."""
        self._declared.discard(name)
        self._vanished.add(name)

    async def _record(
        self,
        project_id: str,
        queue_name: str,
        limit: int | None,
        strategy: ConcurrencyStrategy | None,
        name: str,
        again: bool = False,
    ) -> None:
        config = self._state.queues.get((project_id, queue_name))
        if config is None or again:
            events: list[QueueEvent] = [
                QueueDeclared(
                    at=now_rfc3339(),
                    project_id=project_id,
                    queue_name=queue_name,
                    concurrency_limit=limit,
                    concurrency_strategy=strategy,
                )
            ]
        else:
            events = queue_events(config, project_id, queue_name, limit, strategy)
        for event in events:
            event_id = await self._writer.append(event)
            # Apply now rather than wait for the stream to echo it back, so the
            # next submission does not record the same change again.
            self._state.apply(event, event_id)

    def config_id(self, project_id: str, queue_name: str) -> str | None:
        """The id of the latest registry event about the queue that this gateway knows:
        the one a submission carrying the queue's limit or strategy names."""
        config = self._state.queues.get((project_id, queue_name))
        return config.latest_event_id if config is not None else None


def queue_events(
    config: QueueConfig | None,
    project_id: str,
    queue_name: str,
    limit: int | None,
    strategy: ConcurrencyStrategy | None,
) -> list[QueueEvent]:
    """The registry events that change a queue's recorded config to what is asked."""
    events: list[QueueEvent] = []
    if limit is not None and (config is None or config.concurrency_limit != limit):
        events.append(
            QueueLimitSet(
                at=now_rfc3339(),
                project_id=project_id,
                queue_name=queue_name,
                concurrency_limit=limit,
            )
        )
    if strategy is not None and (config is None or config.concurrency_strategy != strategy):
        events.append(
            QueueStrategySet(
                at=now_rfc3339(),
                project_id=project_id,
                queue_name=queue_name,
                concurrency_strategy=strategy,
            )
        )
    return events


async def configure_queue(
    amqp_url: str,
    project_id: str,
    queue_name: str,
    *,
    limit: int | None,
    strategy: ConcurrencyStrategy | None,
    max_length: int,
    replicas: int | None = None,
) -> list[QueueEvent]:
    """Set a queue's limit and/or strategy, as a submission carrying them would.

    The queue is declared first (as a gateway declares it; an existing one is
    used as it is), so a dispatcher that hears the event finds it and owns it.
    Every event is appended (no replay to compare with): the latest wins anyway.
    ``amqp_url``: one URL or a comma-separated list (the first node that answers).
    """
    connection = await connect(Nodes.parse(amqp_url), "queue-config")
    try:
        await declare_registry(connection, replicas=replicas)
        await declare_queue(
            connection,
            submit_queue(project_id, queue_name),
            submit_queue_arguments(max_length=max_length, replicas=replicas),
        )
        publisher = ConfirmedPublisher(connection, confirm_timeout=10.0, channels=1)
        await publisher.start()
        writer = RegistryWriter(publisher)
        events = queue_events(None, project_id, queue_name, limit, strategy)
        for event in events:
            await writer.append(event)
        return events
    finally:
        await connection.close()
