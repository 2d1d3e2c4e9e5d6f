"""Submission queues as the gateway sees them: declared once, recorded in the registry.

The hot path calls ``ensure`` for every submission; after the first one per
queue it is a set lookup (plus a dict lookup when the submission carries a
concurrency limit).
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractConnection

from broker.registry import RegistryState, RegistryWriter
from broker.topology import declare_queue
from schemas.ids import now_rfc3339
from schemas.registry import QueueDeclared, QueueLimitSet
from schemas.topology import submit_queue, submit_queue_arguments


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

    def known(self, project_id: str, queue_name: str, limit: int | None) -> str | None:
        """The queue's broker name if ``ensure`` has nothing to do for it, else None."""
        name = submit_queue(project_id, queue_name)
        if name not in self._declared:
            return None
        if limit is not None:
            config = self._state.queues.get((project_id, queue_name))
            if config is None or config.concurrency_limit != limit:
                return None
        return name

    async def ensure(self, project_id: str, queue_name: str, limit: int | None) -> str:
        """The broker name of the queue, declared and recorded; raises BrokerError."""
        name = submit_queue(project_id, queue_name)
        if name in self._declared:
            if limit is not None:
                config = self._state.queues.get((project_id, queue_name))
                if config is None or config.concurrency_limit != limit:
                    # Under the queue's lock, and checked again there: a burst of
                    # submissions carrying the new limit records it once, not once
                    # per submission that arrived while the first was appending.
                    async with self._lock(name):
                        await self._record(project_id, queue_name, limit, name)
            return name
        async with self._lock(name):
            if name not in self._declared:
                await declare_queue(self._connection, name, self._arguments)
                await self._record(project_id, queue_name, limit, name, name in self._vanished)
                self._vanished.discard(name)
                self._declared.add(name)
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
        self, project_id: str, queue_name: str, limit: int | None, name: str, again: bool = False
    ) -> None:
        config = self._state.queues.get((project_id, queue_name))
        if config is None or again:
            event: QueueDeclared | QueueLimitSet = QueueDeclared(
                at=now_rfc3339(),
                project_id=project_id,
                queue_name=queue_name,
                concurrency_limit=limit,
            )
        elif limit is not None and config.concurrency_limit != limit:
            event = QueueLimitSet(
                at=now_rfc3339(),
                project_id=project_id,
                queue_name=queue_name,
                concurrency_limit=limit,
            )
        else:
            return
        await self._writer.append(event)
        # Apply now rather than wait for the stream to echo it back, so the
        # next submission does not record the same change again.
        self._state.apply(event)
