"""The dispatcher's watchers: its metrics listener, and its status for the operator page.

Every second the owners are sampled (a queue that went from standby to owned is
a takeover); every ``POLOS_DISPATCHER_STATUS_INTERVAL_SECONDS`` a
``DispatcherStatus`` (``schemas/status.py``) goes to ``polos.status``: what it
owns, each queue's limit, slots held and transition counts. It is transient
and expires after three intervals, on a robust connection of its own, so the
dispatch sessions (built and torn down whole) never wait for it, and it never
for them. A status that cannot be published is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from broker.connection import connect_robust
from broker.topology import declare_status_exchange
from dispatcher.observe import (
    DispatcherObserver,
    Observed,
    OwnersCollector,
    QueueKey,
    owning,
    waiting,
)
from observe import MetricsServer
from schemas.status import MAX_STATUS_QUEUES, DispatcherStatus, QueueStatus, encode_status

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 1.0


class Watchers:
    def __init__(self, dispatcher: Observed, observer: DispatcherObserver) -> None:
        self._dispatcher = dispatcher
        self._observer = observer
        settings = dispatcher.settings
        self._interval = settings.dispatcher_status_interval_seconds
        self.dispatcher_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        observe = settings.observe
        self._server: MetricsServer | None = None
        if observe.metrics_port:
            observer.registry.register(OwnersCollector(dispatcher, observer))
            self._server = MetricsServer(
                observer.registry, host=observe.metrics_host, port=observe.metrics_port
            )
        self._task: asyncio.Task[None] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._owning: dict[QueueKey, bool] = {}

    async def start(self) -> None:
        if self._server is not None:
            await self._server.start()
        if self._server is not None or self._interval > 0:
            self._task = asyncio.create_task(self._run(), name="dispatcher-watchers")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            await self._server.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        await self._observer.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_status = loop.time()
        while True:
            self.sample()
            if self._interval > 0 and loop.time() >= next_status:
                next_status = loop.time() + self._interval
                try:
                    await self._publish()
                except Exception as exc:
                    log.debug("dispatcher status not published: %r", exc)
            await asyncio.sleep(SAMPLE_SECONDS)

    def sample(self) -> None:
        """Count takeovers: queues that went from standby to owned since the last sample."""
        session = self._dispatcher.session
        now = {key: owning(owner) for key, owner in session.owners.items()} if session else {}
        for key, owned in now.items():
            if owned and self._owning.get(key) is False:
                self._observer.takeovers += 1
        if session is not None:  # between sessions, remember the last one
            self._owning = now

    def status(self) -> DispatcherStatus:
        dispatcher = self._dispatcher
        session = dispatcher.session
        owners = list(session.owners.items()) if session is not None else []
        owned = [(key, owner) for key, owner in owners if owning(owner)]
        owned.sort(key=lambda item: -item[1].held)
        counts = self._observer.counts
        keys = {key for key, _ in owned}
        for key in [key for key in counts if key not in keys]:
            del counts[key]  # no longer ours: its rates are another dispatcher's now
        return DispatcherStatus(
            dispatcher_id=self.dispatcher_id,
            at=time.time(),
            interval_seconds=self._interval,
            ready=dispatcher.ready.is_set(),
            sessions=dispatcher.sessions,
            standby=len(owners) - len(owned),
            queues=[
                QueueStatus(
                    project_id=project_id,
                    queue_name=queue_name,
                    limit=owner.limit,
                    holding=owner.held,
                    waiting=waiting(owner),
                    counts=dict(counts.get((project_id, queue_name), {})),
                )
                for (project_id, queue_name), owner in owned[:MAX_STATUS_QUEUES]
            ],
            truncated=max(0, len(owned) - MAX_STATUS_QUEUES),
        )

    async def _publish(self) -> None:
        if self._exchange is None:
            if self._connection is None:
                settings = self._dispatcher.settings
                self._connection = await connect_robust(
                    settings.broker_nodes(),
                    "dispatcher-status",
                    max_backoff=settings.reconnect_interval_seconds,
                )
            channel = await self._connection.channel(publisher_confirms=False)
            self._exchange = await declare_status_exchange(channel)
        message = aio_pika.Message(
            encode_status(self.status()),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            expiration=3 * self._interval,
        )
        # No page open is no error: nobody has bound a queue yet.
        await self._exchange.publish(message, routing_key="", mandatory=False)
