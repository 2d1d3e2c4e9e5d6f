"""Whether a queue exists, asked on a connection of its own.

The registry remembers every queue ever declared, the deleted ones too (by an
operator, by test cleanups): a broker may have a few live queues and thousands
of dead entries. A passive declare answers "does it exist", and for a missing
queue the broker answers by closing the channel (404). Two things make that
dangerous on a connection that also carries consumers and publishes:

- aiormq frees the channel number as soon as the broker's ``Channel.Close``
  arrives, before our ``Channel.CloseOk`` is written, and drops the
  ``CloseOk`` when the connection's write queue (10 frames) is full. A channel
  opened meanwhile may get that number; the broker answers its
  ``Channel.Open`` with ``CHANNEL_ERROR - second 'channel.open' seen``, a
  connection error: every channel of the connection closes. Measured here:
  2,000 missing queues probed 64 at a time, each on a fresh channel, closed
  the connection after about 550 probes.
- Every consumer and every unacknowledged submission of the session lives on
  that connection.

So probes run on a connection that does nothing else, on ``PROBE_CHANNELS``
channels with fixed numbers: a channel is reused until a 404 closes it, and
opened again (same number) only once that 404 reached us, i.e. after its
``CloseOk`` was queued; nothing else on the connection takes a number. With
at most two frames per channel in the write queue, it is never full.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from broker.connection import Nodes, connect
from broker.errors import BrokerUnavailable

# aiormq's write queue holds 10 frames; each probe channel queues at most two
# (a CloseOk and the next Open, or one passive declare), plus a heartbeat.
PROBE_CHANNELS = 4


@dataclass(slots=True)
class _Slot:
    number: int
    channel: AbstractChannel | None = None


class QueueProbe:
    def __init__(self, nodes: Nodes, *, on_lost: Callable[[BaseException | None], None]) -> None:
        self._nodes = nodes
        self._on_lost = on_lost
        self._connection: AbstractConnection | None = None
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        self._closing = False
        self.not_found = 0  # passive declares answered 404

    async def open(self) -> None:
        connection = self._connection = await connect(self._nodes, "dispatcher-probe")
        connection.close_callbacks.add(self._closed)
        for number in range(1, PROBE_CHANNELS + 1):
            self._free.put_nowait(_Slot(number))

    async def close(self) -> None:
        self._closing = True
        if self._connection is not None:
            with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                await self._connection.close()

    async def ready_count(self, name: str) -> int | None:
        """Messages ready in ``name``, None if it does not exist; raises BrokerUnavailable."""
        if self._connection is None:
            raise BrokerUnavailable("the probe connection is not open")
        slot = await self._free.get()
        try:
            if slot.channel is None or slot.channel.is_closed:
                slot.channel = None
                slot.channel = await self._connection.channel(
                    channel_number=slot.number, publisher_confirms=False
                )
            try:
                queue = await slot.channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self.not_found += 1
                return None
            return queue.declaration_result.message_count or 0
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, ValueError) as exc:
            raise BrokerUnavailable(f"cannot look for {name!r}: {exc!r}") from exc
        finally:
            self._free.put_nowait(slot)

    def _closed(self, _connection: object, exc: BaseException | None) -> None:
        if not self._closing:
            self._on_lost(exc)
