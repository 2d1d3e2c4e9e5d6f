"""Publishing what the worker has to say so that it is not lost.

Results go to a results queue that always exists while its execution is in
flight (the owning dispatcher declared it before dispatching), so a failure to
publish is the broker being unavailable: retry with backoff until it is back
(``broker.connection.retry``; the connection meanwhile finds a live node).
A queue that really is missing is reported as ``Unroutable`` after a few tries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from broker.connection import DEFAULT_MAX_BACKOFF_SECONDS, Backoff, retry
from broker.deadletter import dead_letter
from broker.errors import BrokerUnavailable, PublishRejected, Unroutable
from broker.publisher import ConfirmedPublisher

UNROUTABLE_ATTEMPTS = 4


class Reporter:
    def __init__(
        self, publisher: ConfirmedPublisher, *, max_backoff: float = DEFAULT_MAX_BACKOFF_SECONDS
    ) -> None:
        self._publisher = publisher
        self._max_backoff = max_backoff
        self._closed = asyncio.Event()

    def close(self) -> None:
        """Stop retrying: the worker is shutting down, its deliveries go back anyway."""
        self._closed.set()

    async def publish(self, queue: str, body: bytes, *, message_id: str) -> None:
        """Publish persistent and mandatory; return once the broker confirmed it.

        Retries for as long as the broker is unavailable; raises ``Unroutable``
        when ``queue`` does not exist.
        """
        await self._retry(
            lambda: self._publisher.publish(queue, body, message_id=message_id), queue
        )

    async def dead_letter(
        self, body: bytes, *, source_queue: str, reason: str, message_id: str | None
    ) -> None:
        """Keep a poison message once in the dead-letter queue, with the reason."""
        await self._retry(
            lambda: dead_letter(
                self._publisher,
                body,
                source_queue=source_queue,
                reason=reason,
                message_id=message_id,
            ),
            "the dead-letter queue",
        )

    async def _retry(self, publish: Callable[[], Awaitable[None]], where: str) -> None:
        unroutable = 0

        def again(exc: Exception) -> bool:
            nonlocal unroutable
            if isinstance(exc, Unroutable):
                unroutable += 1
                return unroutable < UNROUTABLE_ATTEMPTS
            return isinstance(exc, BrokerUnavailable | PublishRejected)

        await retry(
            publish,
            what=f"publish to {where}",
            backoff=Backoff(self._max_backoff),
            retry_on=again,
            stop=self._closed,
        )
