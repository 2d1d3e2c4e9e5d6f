"""Confirmed publishers pinned by key: what is published for one execution keeps its order.

RabbitMQ keeps the order of the publishes of one channel. The marker and the
work of a dispatch, and the lifecycle events of an execution, go through the
channel their execution id maps to; many executions spread over the channels.
"""

from __future__ import annotations

import zlib

from aio_pika.abc import AbstractConnection

from broker.publisher import ConfirmedPublisher


class PinnedPublishers:
    def __init__(
        self, connection: AbstractConnection, *, confirm_timeout: float, channels: int
    ) -> None:
        self._publishers = [
            ConfirmedPublisher(connection, confirm_timeout=confirm_timeout, channels=1)
            for _ in range(max(1, channels))
        ]

    async def start(self) -> None:
        for publisher in self._publishers:
            await publisher.start()

    async def close(self) -> None:
        for publisher in self._publishers:
            await publisher.close()

    def pick(self, key: str) -> ConfirmedPublisher:
        return self._publishers[zlib.crc32(key.encode()) % len(self._publishers)]
