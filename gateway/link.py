"""The gateway's link to RabbitMQ.

It connects in the background and retries until the broker answers, so the
gateway starts (and answers ``/health``, and 503 on submit) while the broker
is down. Once connected, the robust connection (``broker.connection``) goes
to the next node of the cluster when it loses its own, and restores its
channels by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aio_pika.abc import AbstractRobustConnection

from broker.connection import connect_robust, retry
from broker.publisher import ConfirmedPublisher
from broker.registry import RegistryFollower, RegistryState, RegistryWriter
from broker.topology import declare_dead_letters, declare_dispatch_exchanges
from gateway.announcer import Announcer
from gateway.queues import QueueDirectory
from gateway.settings import Settings

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_SECONDS = 5.0


class BrokerLink:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._nodes = settings.broker_nodes()
        self._backoff = settings.backoff()
        self.state = RegistryState()
        self.connection: AbstractRobustConnection | None = None
        self.publisher: ConfirmedPublisher | None = None
        self.follower: RegistryFollower | None = None
        self.queues: QueueDirectory | None = None
        self.events = Announcer(linger=settings.queued_event_linger_seconds)
        # Given to the publisher once it exists (gateway/observe.py: publish latency).
        self.publish_observer: Callable[[float], None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect_until_done(), name="broker-connect")

    async def wait_ready(self) -> None:
        """Until connected and the registry replayed (tests, scripts)."""
        if self._task is not None:
            await asyncio.shield(self._task)
        if self.follower is not None:
            await self.follower.replayed.wait()

    @property
    def registry_replayed(self) -> bool:
        """Whether the deployments and queues registered before we started are known."""
        return self.follower is not None and self.follower.replayed.is_set()

    @property
    def ready(self) -> bool:
        return self.publisher is not None and self.publisher.available and self.registry_replayed

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.events.close()
        # Only the connection is closed: that closes its channels too. Closing each
        # channel first waits for the broker's Close-Ok, without end when the
        # broker stopped answering (a partition that keeps the TCP connection
        # open), and SIGTERM then never finished. The handlers are done by now,
        # so no confirm is lost by not closing the channels one by one.
        if self.connection is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await self.connection.close()
            except TimeoutError:
                log.warning("the broker did not acknowledge the close; leaving it")

    async def _connect_until_done(self) -> None:
        await retry(self._connect_once, what="connecting to the broker", backoff=self._backoff)
        log.info("connected to the broker")

    async def _connect_once(self) -> None:
        settings = self._settings
        replicas = settings.quorum_group_size
        connection = await connect_robust(
            self._nodes, "gateway", max_backoff=settings.reconnect_interval_seconds
        )
        try:
            publisher = ConfirmedPublisher(
                connection,
                confirm_timeout=settings.confirm_timeout_seconds,
                channels=settings.publish_channels,
            )
            publisher.observer = self.publish_observer
            await publisher.start()
            await declare_dead_letters(connection, replicas=replicas)
            async with connection.channel() as channel:
                # Queued events need the events exchange before any dispatcher ran.
                await declare_dispatch_exchanges(channel)
            if settings.publish_queued_events:
                await self.events.start(connection)
            writer = RegistryWriter(publisher)
            follower = RegistryFollower(connection, writer, self.state, replicas=replicas)
            await follower.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self.connection = connection
        self.publisher = publisher
        self.follower = follower
        self.queues = QueueDirectory(
            connection,
            writer,
            self.state,
            max_length=settings.queue_max_length,
            replicas=replicas,
        )
