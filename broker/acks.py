"""Acknowledgements many to a socket write.

``basic_ack`` marshals one frame with pamqp, queues it for aiormq's writer and
waits until the writer has handed it to the socket: one ``send()`` per
acknowledgement, and a caller that acknowledges several deliveries in turn
waits a writer round for each. In the dispatcher that was the largest single
cost of a flush (``socket.send``, 14 % of its busy time, about three
acknowledgements per execution).

``Acks`` keeps a channel's acknowledgements (and negative ones) made within one
event-loop round and hands them to aiormq's writer as one frame run, in the
order they were made, as ``broker.publisher`` does for publishes. An
acknowledgement is never answered by the broker, so nothing is lost by not
waiting for the socket: ``ack`` returns once the frame is queued, and
``flush`` waits until everything queued so far is with the writer (before a
channel is closed on purpose, so the close does not overtake them). A channel
that closes first has handed its deliveries back to their queues already, as
it would have with ``basic_ack``.

The round's frames go to the writer's queue from a ``call_soon`` callback
when it has room (nearly always): a task each round, as at first, was one
more task created, stepped and awaited per execution in the worker. Only a
full queue (the writer behind) takes a task that waits for room, and until it
is done later frames follow it, so their order stays the order made.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from typing import cast

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError

log = logging.getLogger(__name__)

# A method frame: type 1, channel, payload size 13 | class 60, method | delivery tag (8)
# | bits | frame end. Basic.Ack is method 80 (bit 0: multiple), Basic.Nack 120 (bit 0:
# multiple, bit 1: requeue).
_SETTLE = struct.Struct(">BHIHHQB")
_SIZE = 2 + 2 + 8 + 1
_ACK, _NACK = 80, 120
_END = b"\xce"


def ack_frame(channel_number: int, delivery_tag: int) -> bytes:
    return _SETTLE.pack(1, channel_number, _SIZE, 60, _ACK, delivery_tag, 0) + _END


def nack_frame(channel_number: int, delivery_tag: int, *, requeue: bool) -> bytes:
    bits = 0b10 if requeue else 0
    return _SETTLE.pack(1, channel_number, _SIZE, 60, _NACK, delivery_tag, bits) + _END


class Acks:
    """The acknowledgements of one aiormq channel, written together."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = cast(aiormq.Channel, channel)
        self._pending: list[bytes] = []
        self._soon: asyncio.Handle | None = None
        self._task: asyncio.Task[None] | None = None

    def ack(self, delivery_tag: int) -> None:
        """Queue ``basic.ack``; raises ``ChannelInvalidStateError`` if the channel is closed."""
        self._add(ack_frame(self._number(), delivery_tag))

    def nack(self, delivery_tag: int, *, requeue: bool = True) -> None:
        self._add(nack_frame(self._number(), delivery_tag, requeue=requeue))

    async def flush(self) -> None:
        """Until what was queued so far is with aiormq's writer (or dropped with the channel)."""
        if self._soon is not None:
            self._soon.cancel()
            self._hand_over()
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    def _number(self) -> int:
        if self._channel.is_closed:
            raise ChannelInvalidStateError(f"{self._channel!r} closed")
        number = self._channel.number
        assert number is not None
        return number

    def _add(self, frame: bytes) -> None:
        self._pending.append(frame)
        if self._task is None and self._soon is None:
            self._soon = asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """The round's frames to the writer's queue now, or (full) through ``_write``."""
        self._soon = None
        if self._task is not None or not self._pending:
            return
        channel = self._channel
        queue = channel.write_queue
        if queue.full():
            self._task = asyncio.get_running_loop().create_task(self._write(), name="acks")
            return
        frames, self._pending = self._pending, []
        if channel.is_closed:
            return  # the broker has taken the deliveries back
        payload = frames[0] if len(frames) == 1 else b"".join(frames)
        queue.put_nowait(ChannelFrame(payload=payload, should_close=False))

    async def _write(self) -> None:
        channel = self._channel
        try:
            while self._pending:
                frames, self._pending = self._pending, []
                if channel.is_closed:
                    return  # the broker has taken the deliveries back
                payload = frames[0] if len(frames) == 1 else b"".join(frames)
                # A bounded queue: waits (in order) while the writer is behind.
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        except Exception as exc:  # the connection is going; so are the deliveries
            log.info("acknowledgements not written (%r); the broker requeues them", exc)
        finally:
            self._pending = []
            self._task = None


_BY_CHANNEL: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, Acks] = (
    weakref.WeakKeyDictionary()
)


def acks_of(channel: aiormq.abc.AbstractChannel) -> Acks:
    """The ``Acks`` of ``channel`` (one per channel, so their order is the channel's)."""
    acks = _BY_CHANNEL.get(channel)
    if acks is None:
        acks = _BY_CHANNEL[channel] = Acks(channel)
    return acks


async def flush_all() -> None:
    """``flush`` every channel's acknowledgements (before a process closes its channels)."""
    await asyncio.gather(*(acks.flush() for acks in list(_BY_CHANNEL.values())))
