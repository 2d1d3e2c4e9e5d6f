"""Publishing with publisher confirms, many in flight, errors mapped to ours.

Each caller awaits only its own confirm, so thousands can be outstanding on a
channel at once; awaiting them one after another would cap a process at a few
hundred publishes per second. How the publishes of a channel go out together
and find their confirms is broker/confirms.py; which channel a publish takes,
and replacing one after a nack, broker/channels.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiormq
from aio_pika.abc import AbstractConnection

from broker.channels import RENEW_SECONDS, ChannelPool
from broker.confirms import Batch, Publish
from broker.errors import BrokerUnavailable, ConfirmTimeout, PublishRejected, Unroutable

__all__ = ["RENEW_SECONDS", "ConfirmedPublisher"]


class ConfirmedPublisher:
    """Publishes to the default exchange (routing key = queue name), ``mandatory``, unless told
    otherwise."""

    def __init__(
        self, connection: AbstractConnection, *, confirm_timeout: float, channels: int = 2
    ) -> None:
        self._confirm_timeout = confirm_timeout
        self._pool = ChannelPool(connection, size=channels, confirm_timeout=confirm_timeout)
        self.in_flight = 0  # publishes awaiting their confirm (a metrics gauge reads it)
        # Called with the seconds each publish took to its confirm (or failure).
        self.observer: Callable[[float], None] | None = None

    async def start(self) -> None:
        await self._pool.open()

    async def close(self) -> None:
        await self._pool.close()

    @property
    def available(self) -> bool:
        """Whether a publish can be attempted now (connection and a channel open)."""
        return self._pool.available

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        persistent: bool = True,
        headers: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        exchange: str = "",
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm.

        ``exchange``/``mandatory`` serve fan-out publishes (cancels, lifecycle
        events) where no bound queue is a normal case, not an error.

        Raises ``BrokerUnavailable`` (no connection, channel lost), ``ConfirmTimeout``,
        ``PublishRejected`` (nack: the queue is full) or ``Unroutable`` (no such queue).
        """
        batch = self._pool.pick()
        observer = self.observer
        started = time.perf_counter() if observer is not None else 0.0
        self.in_flight += 1
        try:
            for attempt in range(2):
                item = Publish(
                    body, exchange, routing_key, mandatory, message_id, persistent, headers or None
                )
                try:
                    await self._publish_on(batch, item, timeout)
                    return
                except aiormq.exceptions.DeliveryError as exc:
                    replacement = await self._pool.replacement(batch) if attempt == 0 else None
                    if replacement is None:
                        raise PublishRejected(
                            f"broker rejected the publish to {routing_key!r}"
                        ) from exc
                    batch = replacement
        finally:
            self.in_flight -= 1
            if observer is not None:
                observer(time.perf_counter() - started)

    async def _publish_on(self, batch: Batch, item: Publish, timeout: float | None) -> None:
        """One publish on ``batch``, errors mapped (but a nack: the caller decides)."""
        routing_key = item.routing_key
        try:
            if timeout is None or timeout == self._confirm_timeout:
                await batch.publish(item, self._pool.deadlines)
            else:
                async with asyncio.timeout(timeout):
                    await batch.publish(item, None)
        except aiormq.exceptions.PublishError as exc:  # returned, a DeliveryError too
            raise Unroutable(f"no queue {routing_key!r}") from exc
        except aiormq.exceptions.DeliveryError:
            raise
        except TimeoutError as exc:
            raise ConfirmTimeout(f"no confirm for {routing_key!r} within the timeout") from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise BrokerUnavailable(f"broker unavailable: {exc!r}") from exc
