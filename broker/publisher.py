"""Publishing with publisher confirms, many in flight, errors mapped to ours.

Each caller awaits only its own confirm, so thousands can be outstanding on a
channel at once; awaiting them one after another would cap a process at a few
hundred publishes per second. A small pool of channels spreads the per-channel
write lock of aiormq.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq import spec

from broker.errors import BrokerUnavailable, ConfirmTimeout, PublishRejected, Unroutable

log = logging.getLogger(__name__)

PERSISTENT = 2
TRANSIENT = 1


class ConfirmedPublisher:
    """Publishes to the default exchange (routing key = queue name), ``mandatory``, unless told
    otherwise."""

    def __init__(
        self, connection: AbstractConnection, *, confirm_timeout: float, channels: int = 2
    ) -> None:
        self._connection = connection
        self._confirm_timeout = confirm_timeout
        self._n_channels = max(1, channels)
        self._channels: list[AbstractChannel] = []
        self._next = itertools.cycle(range(self._n_channels))

    async def start(self) -> None:
        for _ in range(self._n_channels):
            self._channels.append(
                await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            )

    async def close(self) -> None:
        for channel in self._channels:
            if not channel.is_closed:
                await channel.close()
        self._channels.clear()

    @property
    def available(self) -> bool:
        """Whether a publish can be attempted now (connection and a channel open)."""
        if self._connection.is_closed or not self._channels:
            return False
        return any(not channel.is_closed for channel in self._channels)

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
        channel = self._pick_channel()
        properties = spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT if persistent else TRANSIENT,
            message_id=message_id,
            headers=dict(headers) if headers else None,
        )
        try:
            # The concrete aiormq.Channel takes ``wait``; its abstract type does not say so.
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            # wait=False: hand the frames to the connection's writer and release
            # the channel lock at once, rather than hold it until the socket has
            # drained them (which admits one publish per writer round trip). The
            # confirm is what we wait for, and a write that fails closes the
            # channel, which fails the confirm. The timeout covers both.
            await underlay.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                timeout=timeout or self._confirm_timeout,
                wait=False,
            )
        except TimeoutError as exc:
            raise ConfirmTimeout(f"no confirm for {routing_key!r} within the timeout") from exc
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"no queue {routing_key!r}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishRejected(f"broker rejected the publish to {routing_key!r}") from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise BrokerUnavailable(f"broker unavailable: {exc!r}") from exc

    def _pick_channel(self) -> AbstractChannel:
        if self._connection.is_closed or not self._channels:
            raise BrokerUnavailable("not connected to the broker")
        for _ in range(self._n_channels):
            channel = self._channels[next(self._next)]
            if not channel.is_closed:
                return channel
        raise BrokerUnavailable("no open channel to the broker")
