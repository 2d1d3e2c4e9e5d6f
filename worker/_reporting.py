"""Publishing what the worker has to say so that it is not lost.

Results go to a results queue that always exists while its execution is in
flight (the owning dispatcher declared it before dispatching), so a failure to
publish is the broker being unavailable: retry with backoff until it is back.
A queue that really is missing is reported as ``Unroutable`` after a few tries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from broker.deadletter import dead_letter
from broker.errors import BrokerUnavailable, PublishRejected, Unroutable
from broker.publisher import ConfirmedPublisher

log = logging.getLogger(__name__)

INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
UNROUTABLE_ATTEMPTS = 4


class Reporter:
    def __init__(self, publisher: ConfirmedPublisher) -> None:
        self._publisher = publisher
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
        backoff = INITIAL_BACKOFF_S
        unroutable = 0
        while True:
            if self._closed.is_set():
                raise BrokerUnavailable(f"worker stopped before {where} confirmed")
            try:
                await publish()
                return
            except Unroutable:
                unroutable += 1
                if unroutable >= UNROUTABLE_ATTEMPTS:
                    raise
                log.warning("publish to %s: no such queue (attempt %d)", where, unroutable)
            except (BrokerUnavailable, PublishRejected) as exc:
                log.warning("publish to %s failed (%r); retrying in %.1fs", where, exc, backoff)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._closed.wait()
            backoff = min(backoff * 2, MAX_BACKOFF_S)
